"""Ollama's API: ``/api/generate`` and ``/api/chat`` as fleet jobs, streamed as NDJSON in
Ollama's chunk shape (one object with ``"stream": false``); ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from avocado_infer.answer import NDJSON, Framing, answer
from avocado_infer.bodies import NOT_BLANK, ToolCallBody
from avocado_infer.deps import ADMITTED, GatewayDep
from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error
from avocado_infer.reading import Ending
from avocado_shared.contracts import ToolCall, Usage
from avocado_shared.errors import AvocadoError
from avocado_shared.fleet import ModelMeta

__all__ = ["ollama_counts", "ollama_ns", "router"]


router = APIRouter(
    prefix="/api",
    route_class=error_route(plain_error, json_bodies=True),
    responses=documented_errors(PlainError),
)


class _Body(BaseModel):
    """What both generation routes take; fields of Ollama's this fleet does not use are
    ignored, as Ollama ignores unknown ones."""

    model_config = ConfigDict(extra="ignore")

    model: str
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | None = None
    stream: bool = True

    def job_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "options": self.options,
            "format": self.format or None,
            "keep_alive": self.keep_alive,
        }


class GenerateBody(_Body):
    prompt: str = Field(json_schema_extra=NOT_BLANK)
    system: str | None = None
    images: list[str] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None

    def job_fields(self) -> dict[str, Any]:
        return super().job_fields() | ({"tools": self.tools} if self.tools else {})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_ns(ms: float) -> int:
    """A duration in Ollama's unit, nanoseconds."""
    return round(ms * 1e6)


def ollama_counts(usage: Usage) -> dict[str, Any]:
    """The final chunk's done reason, counts and durations (Ollama's are in ns)."""
    return {
        # Ollama's reason for an answer that called tools is "stop" (OpenAI's: tool_calls).
        "done_reason": usage.done_reason
        if usage.done_reason not in (None, "tool_calls")
        else "stop",
        "total_duration": ollama_ns(usage.total_duration_ms),
        "load_duration": ollama_ns(usage.load_duration_ms),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": ollama_ns(usage.prompt_eval_duration_ms),
        "eval_count": usage.completion_tokens,
        "eval_duration": ollama_ns(usage.eval_duration_ms),
    }


class _Shapes:
    """Ollama's chunks of one answer: every chunk holds ``value(text)`` under ``key`` (the
    generate or the chat shape); the last one the counts."""

    framing: Framing = NDJSON

    def __init__(self, model: str, key: str, value: Callable[[str], Any]) -> None:
        self.model, self.key, self.value = model, key, value

    def _chunk(self, model: str, text: str, done: bool) -> dict[str, Any]:
        return {"model": model, "created_at": _now(), self.key: self.value(text), "done": done}

    def whole(self, text: str, end: Ending) -> dict[str, Any]:
        chunk = self._chunk(end.usage.model, text, True) | ollama_counts(end.usage)
        if end.tool_calls:
            chunk[self.key]["tool_calls"] = _calls(end.tool_calls)
        return chunk

    def piece(self, text: str) -> list[dict[str, Any]]:
        return [self._chunk(self.model, text, False)]

    def last(self, end: Ending) -> list[dict[str, Any]]:
        """The tool calls in a chunk of their own, as Ollama streams them, then the counts."""
        final = self.whole("", Ending(end.usage))
        if not end.tool_calls:
            return [final]
        calls = self._chunk(self.model, "", False)
        calls[self.key]["tool_calls"] = _calls(end.tool_calls)
        return [calls, final]

    def failed(self, error: AvocadoError) -> dict[str, Any]:
        return {"error": str(error)}


def _calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls in Ollama's shape: the arguments an object (left as the model's text when
    that is not one, rather than dropped)."""
    return [
        {
            "id": call.id,
            "function": {
                "index": index,
                "name": call.function.name,
                "arguments": _arguments(call.function.arguments),
            },
        }
        for index, call in enumerate(calls)
    ]


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _message(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


_ANSWER = NDJSON.documented(
    "Chunks as NDJSON, the last with done true and the counts; one such object with stream false."
)


@router.post("/generate", dependencies=ADMITTED, responses=_ANSWER)
async def generate(body: GenerateBody, gateway: GatewayDep, request: Request) -> Response:
    job = {"prompt": body.prompt, "system": body.system, **body.job_fields()}
    if body.images:
        job["images"] = body.images
    shapes = _Shapes(body.model, "response", str)
    return await answer(request, gateway, job, lambda _: shapes, streamed=body.stream)


@router.post("/chat", dependencies=ADMITTED, responses=_ANSWER)
async def chat(body: ChatBody, gateway: GatewayDep, request: Request) -> Response:
    job = {"messages": [m.model_dump(exclude_none=True) for m in body.messages]}
    shapes = _Shapes(body.model, "message", _message)
    return await answer(
        request, gateway, job | body.job_fields(), lambda _: shapes, streamed=body.stream
    )


@router.get("/tags")
async def tags(gateway: GatewayDep) -> dict[str, Any]:
    """The models live nodes serve (jobs for any other get a 404); sizes and digests are the
    nodes' own, unknown here. ``avocado`` says, per model, its nodes and its backlog."""
    models = [
        {
            "name": m.label,
            "model": m.label,
            "modified_at": m.seen_at.isoformat(),
            "size": 0,
            "digest": "",
            "details": _details(m.meta),
            "avocado": m.view(),
        }
        for m in await gateway.models()
    ]
    return {"models": models}


@router.get("/ps")
async def ps(gateway: GatewayDep) -> dict[str, Any]:
    """The models some live node holds in memory; ``expires_at`` is when the last node that
    serves one stops vouching for it unless it refreshes its record. ``avocado`` says, per
    model, its nodes (slots, jobs running, draining and the time left) and its backlog per
    lane. Sizes and digests are the nodes' own, unknown here: zero and empty."""
    models = [
        {
            "name": m.label,
            "model": m.label,
            "size": 0,
            "digest": "",
            "details": _details(m.meta),
            "expires_at": m.expires_at.isoformat(),
            "size_vram": 0,
            "avocado": m.view(),
        }
        for m in await gateway.models()
        if m.loaded
    ]
    return {"models": models}


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        validation_alias=AliasChoices("model", "name"),  # ``name``: Ollama's older clients
        json_schema_extra=NOT_BLANK,
    )
    verbose: bool = False


def _details(meta: ModelMeta | None) -> dict[str, Any]:
    """Ollama's ``details`` of a model, as its nodes' servers gave them; ``{}`` when none
    did."""
    if meta is None:
        return {}
    return {
        "parent_model": "",
        "format": meta.format or "",
        "family": meta.family or "",
        "families": meta.families,
        "parameter_size": meta.parameter_size or "",
        "quantization_level": meta.quantization_level or "",
    }


def _model_info(meta: ModelMeta) -> dict[str, Any]:
    """Ollama's ``model_info``: the architecture and the sizes under its name
    (``llama.context_length``); ``general.`` where no node's server named one."""
    arch = meta.architecture or meta.family
    sizes = {
        "general.architecture": arch,
        "general.parameter_count": meta.parameter_count,
        f"{arch or 'general'}.context_length": meta.context_length,
        f"{arch or 'general'}.embedding_length": meta.embedding_length,
    }
    return {key: value for key, value in sizes.items() if value is not None}


@router.post("/show")
async def show(body: ShowBody, gateway: GatewayDep) -> dict[str, Any]:
    """What the nodes that serve the model said of it (details, context length,
    capabilities); 404 when no live node serves it. The template, parameters and licence
    are each node's own (they may differ): empty here."""
    served = await gateway.model(body.model)
    meta = served.meta or ModelMeta()
    return {
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(meta),
        "model_info": _model_info(meta),
        # A model no node described yet is one the fleet runs generations for.
        "capabilities": meta.capabilities or ["completion"],
        "modified_at": (meta.modified_at or served.seen_at).isoformat(),
        "avocado": served.view(),
    }


# Ollama's model-management routes, with their methods: a fleet's models live on its nodes.
_MANAGEMENT = {
    "/pull": "POST",
    "/push": "POST",
    "/create": "POST",
    "/copy": "POST",
    "/delete": "DELETE",
}


async def _managed_on_nodes(request: Request) -> Response:
    """Refused in Ollama's shape (403), not a 404 that reads as a missing gateway: models
    are pulled, created and deleted on the nodes, each by its own server."""
    what = request.url.path.removeprefix("/api/")
    return plain_error(
        403,
        f"{what} is not offered by this fleet: models are managed on its nodes (each node's "
        "server pulls and keeps its own); /api/tags lists the models they serve",
        True,
    )


for _path, _method in _MANAGEMENT.items():
    router.add_api_route(
        _path,
        _managed_on_nodes,
        methods=[_method],
        responses={403: {"model": PlainError, "description": "Models are managed on the nodes."}},
        summary=f"{_method} /api{_path}: not offered (403)",
    )


@router.get("/version")
async def ollama_version() -> dict[str, str]:
    """The gateway's version (a client reads it to know an Ollama API answers)."""
    return {"version": version("avocado-infer")}
