"""Ollama's API: ``/api/generate`` and ``/api/chat`` as fleet jobs, streamed as NDJSON in
Ollama's chunk shape (one object with ``"stream": false``); ``/api/tags``, ``/api/ps``,
``/api/version``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from avocado_infer.access import admitted
from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error
from avocado_infer.gateway import Gateway, gateway
from avocado_infer.relay import (
    JOB_ID_HEADER,
    Usage,
    encoded,
    left,
    ndjson,
    opened,
    pieces,
    unless_left,
    whole,
)
from avocado_shared.errors import AvocadoError
from avocado_shared.jobs import JobHandle

__all__ = ["ollama_counts", "router"]


router = APIRouter(
    prefix="/api",
    route_class=error_route(plain_error, json_bodies=True),
    responses=documented_errors(PlainError),
)
Fleet = Annotated[Gateway, Depends(gateway)]
Admitted = [Depends(admitted)]  # a generation: the queue's room and its key's limits


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


# In the schema only: the job contract refuses a blank prompt, in its own words.
NOT_BLANK: dict[str, Any] = {"pattern": r"\S"}


class GenerateBody(_Body):
    prompt: str = Field(json_schema_extra=NOT_BLANK)
    system: str | None = None


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


def _chunk(model: str, key: str, value: Any, done: bool) -> dict[str, Any]:
    return {"model": model, "created_at": _now(), key: value, "done": done}


def _failed(error: AvocadoError) -> dict[str, Any]:
    return {"error": str(error)}


async def _answer(
    request: Request,
    fleet: Gateway,
    handle: JobHandle[Any],
    body: _Body,
    key: str,
    value: Callable[[str], Any],
) -> Response:
    """``value(text)`` under ``key`` in every chunk: the generate or the chat shape."""
    stream = fleet.stream(handle.id)
    timeout = fleet.settings.stream_timeout_s

    def cancel() -> None:
        fleet.producer.cancel(handle.id)

    if not body.stream:
        got = await unless_left(
            request, lambda: whole(stream, body.model, timeout), handle.id, cancel
        )
        if got is None:
            return left()
        text, usage = got
        done = _chunk(usage.model, key, value(text), True) | ollama_counts(usage)
        return JSONResponse(done, headers={JOB_ID_HEADER: handle.id})
    answer = await opened(request, pieces(stream, body.model, timeout), handle.id, cancel)
    if answer is None:
        return left()
    chunks = encoded(
        answer,
        lambda text: _chunk(body.model, key, value(text), False),
        lambda usage: [_chunk(usage.model, key, value(""), True) | ollama_counts(usage)],
        _failed,
    )
    return ndjson(chunks, handle.id, cancel)


def _message(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# What a generation answers, for the OpenAPI schema: the route builds its response itself.
_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Chunks as NDJSON, the last with done true and the counts; one such "
        "object with stream false.",
        "content": {"application/x-ndjson": {}},
    }
}


@router.post("/generate", dependencies=Admitted, responses=_ANSWER)
async def generate(body: GenerateBody, fleet: Fleet, request: Request) -> Response:
    handle = await fleet.generate(prompt=body.prompt, system=body.system, **body.job_fields())
    return await _answer(request, fleet, handle, body, "response", str)


@router.post("/chat", dependencies=Admitted, responses=_ANSWER)
async def chat(body: ChatBody, fleet: Fleet, request: Request) -> Response:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    handle = await fleet.generate(messages=messages, **body.job_fields())
    return await _answer(request, fleet, handle, body, "message", _message)


@router.get("/tags")
async def tags(fleet: Fleet) -> dict[str, Any]:
    """The models the live fleet serves; sizes and digests are the nodes' own, unknown here."""
    models = [
        {
            "name": m.name,
            "model": m.name,
            "modified_at": m.seen_at.isoformat(),
            "size": 0,
            "digest": "",
            "details": {},
        }
        for m in await fleet.models()
    ]
    return {"models": models}


@router.get("/ps")
async def ps(fleet: Fleet) -> dict[str, Any]:
    """The models live nodes serve, as the models running; ``expires_at`` is when the last
    node that serves one stops vouching for it unless it refreshes its record. Which models
    a node's server holds in memory, and their sizes and digests, are not announced: zero
    and empty."""
    until: dict[str, datetime] = {}
    for node in await fleet.nodes():
        for name in node.models:
            until[name] = max(until.get(name, node.expires_at), node.expires_at)
    models = [
        {
            "name": name,
            "model": name,
            "size": 0,
            "digest": "",
            "details": {},
            "expires_at": until[name].isoformat(),
            "size_vram": 0,
        }
        for name in sorted(until)
    ]
    return {"models": models}


@router.get("/version")
async def ollama_version() -> dict[str, str]:
    """The gateway's version (a client reads it to know an Ollama API answers)."""
    return {"version": version("avocado-infer")}
