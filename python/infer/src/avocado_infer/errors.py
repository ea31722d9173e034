"""What goes wrong between an HTTP request and its job's answer, and the status it gets.

Each API answers in its own error shape: a route class made by ``error_route`` catches bad
input (FastAPI's ``RequestValidationError``, malformed JSON included, and its ``HTTPException``
for a body it cannot read) and the fleet's errors before FastAPI's app-wide handlers would, so
nothing the client caused becomes a 500 or an answer in another shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from avocado_shared.contracts import InvalidRequest
from avocado_shared.errors import (
    AvocadoError,
    NotFound,
    PermanentError,
    TransientError,
    Unavailable,
)
from avocado_shared.streams import JobRefused, StreamFailed, StreamTimedOut

__all__ = [
    "AnswerRestarted",
    "ModelNotServed",
    "OverLimit",
    "PlainError",
    "QueueFull",
    "RegistryUnavailable",
    "Render",
    "Unauthorized",
    "describe",
    "documented_errors",
    "error_route",
    "http_status",
    "plain_error",
]

Render = Callable[[int, str, bool, str | None], Response]
"""An API's error response for a status, a message, whether retrying cannot help, and a
machine-readable code (OpenAI's ``code``)."""


class AnswerRestarted(PermanentError):
    """The job's answer started over on another worker (its server cannot continue a partial
    answer) after part of it was sent: a stream cannot take back what the client has."""


class RegistryUnavailable(Unavailable):
    """Redis, which holds the node and fleet registries, could not be read."""


class ModelNotServed(NotFound):
    """No live node serves the model a request names (404, as Ollama answers for a model it
    lacks); nothing was queued."""

    code: ClassVar[str] = "model_not_found"


class Unauthorized(PermanentError):
    """No API key, or one that is unknown or revoked (401)."""

    code: ClassVar[str] = "invalid_api_key"


class OverLimit(TransientError):
    """A key over its requests a minute or its requests at once (429, ``retry_after``)."""

    code: ClassVar[str] = "rate_limit_exceeded"


class QueueFull(TransientError):
    """The generate queue is as deep as the gateway lets it grow (503, ``retry_after``)."""


class PlainError(BaseModel):
    """Ollama's error body, for the OpenAPI schema."""

    error: str


def documented_errors(body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The errors a router's routes answer, in ``body``'s shape, for the OpenAPI schema: bad
    input is a 400 (never FastAPI's default 422, which documenting 4XX replaces)."""
    return {
        "4XX": {
            "model": body,
            "description": "Bad input or a request the inference server refused (400), no "
            "API key or a wrong one (401), a model-management route (403), an unknown job "
            "(404), a body over the limit (413), a key over its limits (429, Retry-After), in "
            "the API's error shape.",
        },
        "5XX": {
            "model": body,
            "description": "The job failed (502), the broker or Redis does not answer or the "
            "queue is full (503, Retry-After), or no answer came in time (504).",
        },
    }


def plain_error(status: int, message: str, permanent: bool, code: str | None = None) -> Response:
    """Ollama's error shape, ``{"error": message}``; the fleet's own routes answer in it too."""
    return JSONResponse({"error": message}, status_code=status)


def http_status(error: AvocadoError) -> int:
    """The status a fleet error maps to: the client's fault, the fleet's, or not yet."""
    if isinstance(error, InvalidRequest | JobRefused):
        return 400
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Unauthorized):
        return 401
    if isinstance(error, OverLimit):
        return 429
    if isinstance(error, StreamTimedOut):
        return 504
    if isinstance(error, StreamFailed | AnswerRestarted):
        return 502
    if isinstance(error, TransientError):
        return 503
    return 500


def describe(errors: Sequence[Any]) -> str:
    """pydantic's report in one line a client can act on."""
    parts = []
    for item in errors:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _as_json(request: Request) -> Request:
    """``request`` with its body declared JSON, whatever content type it came with."""
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return Request({**request.scope, "headers": headers}, request.receive)


def error_route(render: Render, *, json_bodies: bool = False) -> type[APIRoute]:
    """A route class whose bad input and fleet errors answer in ``render``'s shape;
    ``json_bodies``: read every body as JSON, as Ollama does (``curl -d`` sends a form's
    content type)."""

    class ErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                if json_bodies:
                    request = _as_json(request)
                try:
                    return await handler(request)
                except RequestValidationError as error:
                    return render(400, describe(error.errors()), True, None)
                except HTTPException as error:
                    # FastAPI's own, such as a body that is not UTF-8 ("There was an error
                    # parsing the body"): its status and headers, in the API's shape.
                    response = render(
                        error.status_code, str(error.detail), error.status_code < 500, None
                    )
                    response.headers.update(error.headers or {})
                    return response
                except AvocadoError as error:
                    return _rendered(render, error)

            return handle

    return ErrorRoute


def _rendered(render: Render, error: AvocadoError) -> Response:
    """``error`` in ``render``'s shape, with the headers its status calls for: when to come
    back (``Retry-After``, whole seconds), how to authenticate (``WWW-Authenticate``)."""
    status = http_status(error)
    permanent = isinstance(error, PermanentError)
    response = render(status, str(error), permanent, getattr(error, "code", None))
    if isinstance(error, TransientError) and error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response
