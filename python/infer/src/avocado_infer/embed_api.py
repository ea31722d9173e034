"""Embeddings as fleet jobs: Ollama's ``POST /api/embed`` and older ``POST /api/embeddings``,
OpenAI's ``POST /v1/embeddings`` (floats or base64), each in its API's shapes and errors.

An embedding streams nothing: the request waits for its job to end (its stream's end, written
once the worker stored the vectors), then answers them from ``ml_results``. As for a
generation, its key's limits apply, a model no live node serves is a 404 and a full lane a
503, and a client that leaves first cancels the job.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from avocado_infer.answer import (
    CLIENT_CLOSED_REQUEST,
    JOB_ID_HEADER,
    ended,
    request_lane,
    request_owner,
)
from avocado_infer.deps import ADMITTED, GatewayDep
from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error
from avocado_infer.gateway import Gateway
from avocado_infer.ollama_api import ollama_ns
from avocado_infer.openai_api import OpenAIError, openai_error
from avocado_shared.contracts import EmbedResult, InvalidRequest
from avocado_shared.errors import Unavailable

__all__ = ["OpenAIEmbeddingsBody", "ollama_router", "openai_router"]

ollama_router = APIRouter(
    prefix="/api",
    route_class=error_route(plain_error, json_bodies=True),
    responses=documented_errors(PlainError),
)
openai_router = APIRouter(
    prefix="/v1", route_class=error_route(openai_error), responses=documented_errors(OpenAIError)
)


async def _embedded(
    request: Request, gateway: Gateway, texts: str | Sequence[str], **fields: Any
) -> tuple[str, EmbedResult] | None:
    """Publish the embedding of ``texts`` and wait for its vectors; None when the client left
    first."""
    owner = request_owner(request)
    handle = await gateway.embed(texts, lane=request_lane(request), owner=owner, **fields)
    if not await ended(request, gateway, handle.id, str(fields["model"])):
        return None
    result = await gateway.result(handle.id)
    if not isinstance(result, EmbedResult):
        raise Unavailable(
            f"job {handle.id} ended, but its vectors cannot be read now: ask GET /jobs/{handle.id}",
            retry_after=gateway.settings.busy_retry_after_s,
        )
    return handle.id, result


def _answer(job_id: str, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={JOB_ID_HEADER: job_id})


class _OllamaBody(BaseModel):
    """Fields of Ollama's this fleet does not use are ignored, as Ollama ignores them."""

    model_config = ConfigDict(extra="ignore")

    model: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | None = None

    def job_fields(self) -> dict[str, Any]:
        """The job's fields; an option sent as null is left out, as Ollama leaves it (LangChain
        sends every option it knows, unset ones null)."""
        options = {k: v for k, v in (self.options or {}).items() if v is not None}
        return {"model": self.model, "options": options, "keep_alive": self.keep_alive}


class EmbedBody(_OllamaBody):
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)


class EmbeddingsBody(_OllamaBody):
    prompt: str = ""


@ollama_router.post("/embed", dependencies=ADMITTED)
async def embed(body: EmbedBody, gateway: GatewayDep, request: Request) -> Response:
    """One vector per text of ``input``, each of length 1, as Ollama answers; no input, no
    vector (and no job)."""
    if not body.input:
        return JSONResponse({"model": body.model, "embeddings": []})
    fields = {"truncate": body.truncate, "dimensions": body.dimensions, **body.job_fields()}
    got = await _embedded(request, gateway, body.input, **fields)
    if got is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    job_id, result = got
    return _answer(
        job_id,
        {
            "model": body.model,
            "embeddings": result.embeddings,
            "total_duration": ollama_ns(result.total_duration_ms),
            "load_duration": ollama_ns(result.load_duration_ms),
            "prompt_eval_count": result.prompt_tokens,
        },
    )


@ollama_router.post("/embeddings", dependencies=ADMITTED)
async def embeddings(body: EmbeddingsBody, gateway: GatewayDep, request: Request) -> Response:
    """Ollama's older route: one ``prompt``, one ``embedding``; an empty prompt, an empty one."""
    if not body.prompt:
        return JSONResponse({"embedding": []})
    got = await _embedded(request, gateway, body.prompt, **body.job_fields())
    if got is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    job_id, result = got
    return _answer(job_id, {"embedding": result.embeddings[0]})


class OpenAIEmbeddingsBody(BaseModel):
    """OpenAI's request; ``user`` and fields this fleet does not use are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def texts(self) -> str | list[str]:
        """The texts to embed; token arrays are refused: a node's model has a tokenizer of its
        own, which the client's tokens need not match."""
        given = self.input
        if isinstance(given, str) or all(isinstance(item, str) for item in given):
            return given  # type: ignore[return-value]
        raise InvalidRequest("input: token arrays are not supported here: send the texts")

    def job(self) -> dict[str, Any]:
        """The embedding job's fields besides its texts."""
        return {"model": self.model, "dimensions": self.dimensions}

    def answer(self, result: EmbedResult) -> dict[str, Any]:
        """OpenAI's list of embeddings, one per text, in order, as floats or base64."""
        encode = _base64 if self.encoding_format == "base64" else list
        data = [
            {"object": "embedding", "index": i, "embedding": encode(vector)}
            for i, vector in enumerate(result.embeddings)
        ]
        tokens = result.prompt_tokens
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": self.model, "usage": usage}


def _base64(vector: Sequence[float]) -> str:
    """``vector`` as OpenAI sends it base64: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@openai_router.post("/embeddings", dependencies=ADMITTED)
async def openai_embeddings(
    body: OpenAIEmbeddingsBody, gateway: GatewayDep, request: Request
) -> Response:
    """One embedding object per text, in order, as floats or base64, with the tokens read."""
    got = await _embedded(request, gateway, body.texts(), **body.job())
    if got is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    job_id, result = got
    return _answer(job_id, body.answer(result))
