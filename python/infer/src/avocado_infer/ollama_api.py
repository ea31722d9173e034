"""Ollama's API: ``/api/generate`` and ``/api/chat`` as fleet jobs, streamed as NDJSON in
Ollama's chunk shape (one object with ``"stream": false``); ``/api/tags``, ``/api/ps``,
``/api/version``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from avocado_infer.answer import NDJSON, Framing, answer
from avocado_infer.bodies import NOT_BLANK
from avocado_infer.deps import ADMITTED, GatewayDep
from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error
from avocado_shared.contracts import Usage
from avocado_shared.errors import AvocadoError

__all__ = ["ollama_counts", "router"]


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


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_counts(usage: Usage) -> dict[str, Any]:
    """The final chunk's done reason, counts and durations (Ollama's are in ns)."""

    def ns(ms: float) -> int:
        return round(ms * 1e6)

    return {
        "done_reason": usage.done_reason or "stop",
        "total_duration": ns(usage.total_duration_ms),
        "load_duration": ns(usage.load_duration_ms),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": ns(usage.prompt_eval_duration_ms),
        "eval_count": usage.completion_tokens,
        "eval_duration": ns(usage.eval_duration_ms),
    }


class _Shapes:
    """Ollama's chunks of one answer: every chunk holds ``value(text)`` under ``key`` (the
    generate or the chat shape); the last one the counts."""

    framing: Framing = NDJSON

    def __init__(self, model: str, key: str, value: Callable[[str], Any]) -> None:
        self.model, self.key, self.value = model, key, value

    def _chunk(self, model: str, text: str, done: bool) -> dict[str, Any]:
        return {"model": model, "created_at": _now(), self.key: self.value(text), "done": done}

    def whole(self, text: str, usage: Usage) -> dict[str, Any]:
        return self._chunk(usage.model, text, True) | ollama_counts(usage)

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk(self.model, text, False)

    def last(self, usage: Usage) -> list[dict[str, Any]]:
        return [self.whole("", usage)]

    def failed(self, error: AvocadoError) -> dict[str, Any]:
        return {"error": str(error)}


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
            "details": {},
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
            "details": {},
            "expires_at": m.expires_at.isoformat(),
            "size_vram": 0,
            "avocado": m.view(),
        }
        for m in await gateway.models()
        if m.loaded
    ]
    return {"models": models}


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
