"""The one answer path of every API: a generation published as a fleet job, its answer read
from the job's token stream (``reading``) and given to the client in the API's shapes
(an ``Encoder``), whole or streamed. A client that goes away before its answer is out cancels
the job, whether it was waiting for the whole answer, for the first piece, or in the middle of
the stream; the route's key slot (``deps.admitted``) is held until the response has ended."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from avocado_infer.gateway import Gateway
from avocado_infer.reading import Ending, answer_pieces, whole_answer
from avocado_shared.contracts import InvalidRequest
from avocado_shared.errors import AvocadoError
from avocado_shared.keys import ApiKey
from avocado_shared.routing import Lane, parse_lane

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "JOB_ID_HEADER",
    "LANE_HTTP_HEADER",
    "NDJSON",
    "SSE",
    "SSE_EVENTS",
    "Encoder",
    "Framing",
    "answer",
    "ended",
    "request_lane",
    "request_owner",
]

logger = logging.getLogger(__name__)

# Names the job behind a response, for ``ml_results`` and ``avocado result``.
JOB_ID_HEADER = "X-Avocado-Job-Id"
# A request's lane: its key's default (interactive unless made with --lane batch) when unset.
LANE_HTTP_HEADER = "X-Avocado-Lane"

# nginx's "client closed request": the status of an answer no one was left to read.
CLIENT_CLOSED_REQUEST = 499

T = TypeVar("T")


@dataclass(frozen=True)
class Framing:
    """How an API streams its chunks: its media type and the bytes of each chunk."""

    media_type: str
    frame: Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]]

    def documented(self, description: str) -> dict[int | str, dict[str, Any]]:
        """A generation route's answer, for the OpenAPI schema: the route builds its
        response itself, so FastAPI cannot tell."""
        return {200: {"description": description, "content": {self.media_type: {}}}}


class Encoder(Protocol):
    """One API's shapes of an answer; it knows nothing of jobs, streams or clients."""

    def whole(self, text: str, end: Ending) -> dict[str, Any]:
        """The whole answer in one object."""

    def piece(self, text: str) -> Iterable[dict[str, Any]]:
        """The chunks of a streamed piece of the text."""

    def last(self, end: Ending) -> Iterable[dict[str, Any]]:
        """The chunks that end a streamed answer (the tool calls among them)."""

    def failed(self, error: AvocadoError) -> dict[str, Any]:
        """The chunk that ends a streamed answer whose job failed once streaming began."""

    @property
    def framing(self) -> Framing:
        """How the API streams its chunks (``NDJSON`` or ``SSE``)."""


def _request_key(request: Request) -> ApiKey | None:
    """The API key a request came with: ``deps.caller`` keeps it on the request."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return key


def request_lane(request: Request) -> Lane:
    """The lane a request asks for in ``X-Avocado-Lane``; unset, its key's lane, else
    interactive."""
    key = _request_key(request)
    try:
        return parse_lane(
            request.headers.get(LANE_HTTP_HEADER), Lane.INTERACTIVE if key is None else key.lane
        )
    except ValueError as error:
        raise InvalidRequest(f"{LANE_HTTP_HEADER}: {error}") from None


def request_owner(request: Request) -> str | None:
    """The name of the key a request came with: the owner of the job it queues
    (``ownership``); None when the gateway asks for no key."""
    key = _request_key(request)
    return None if key is None else key.name


async def answer(
    request: Request,
    gateway: Gateway,
    job: Mapping[str, Any],
    encoder: Callable[[str], Encoder],
    *,
    streamed: bool,
) -> Response:
    """Publish the generation ``job`` (``Gateway.generate``'s fields), the job of the
    request's key (``ownership``), and answer with it in
    the shapes of ``encoder(job_id)``: one object, or a stream once its first piece is there
    (a job that fails or never starts gets an HTTP error status, as nothing was sent yet)."""
    owner = request_owner(request)
    handle = await gateway.generate(**job, lane=request_lane(request), owner=owner)
    job_id, model = handle.id, str(job["model"])
    shapes = encoder(job_id)
    timeout = gateway.settings.stream_timeout_s
    if not streamed:
        got = await _unless_client_leaves(
            request, gateway, job_id, whole_answer(gateway, job_id, model, timeout)
        )
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(shapes.whole(*got), headers={JOB_ID_HEADER: job_id})
    answered = answer_pieces(gateway, job_id, model, timeout)
    first = await _unless_client_leaves(request, gateway, job_id, anext(answered))
    if first is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = _Watched(shapes.framing.frame(_encoded(first, answered, shapes)))

    async def after() -> None:
        if not body.whole:  # the client left mid-answer
            await _cancel(gateway, job_id)

    return StreamingResponse(
        body,
        media_type=shapes.framing.media_type,
        headers={JOB_ID_HEADER: job_id},
        background=BackgroundTask(after),
    )


async def ended(request: Request, gateway: Gateway, job_id: str, model: str) -> bool:
    """Wait for a job that streams no text (an embedding) to end, as its stream's end says
    (``StreamFailed`` when it failed); False when its client left first (the job is then
    cancelled)."""
    timeout = gateway.settings.stream_timeout_s
    wait = whole_answer(gateway, job_id, model, timeout)
    return await _unless_client_leaves(request, gateway, job_id, wait) is not None


async def _encoded(
    first: str | Ending, rest: AsyncIterator[str | Ending], shapes: Encoder
) -> AsyncIterator[dict[str, Any]]:
    """The API's chunks for the answer; a failure once streaming began ends it with
    ``shapes.failed``'s chunk (the status was sent with the first)."""

    async def every() -> AsyncIterator[str | Ending]:
        yield first
        async for piece in rest:
            yield piece

    try:
        async for piece in every():
            chunks = shapes.last(piece) if isinstance(piece, Ending) else shapes.piece(piece)
            for chunk in chunks:
                yield chunk
    except AvocadoError as error:
        yield shapes.failed(error)


async def _cancel(gateway: Gateway, job_id: str) -> None:
    """Cancel the job of a client that left; a failure to is logged, not raised."""
    try:
        await gateway.cancel(job_id)
    except AvocadoError as error:
        logger.warning("job %s not cancelled after its client left: %s", job_id, error)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away. Its body was read whole: the server's next
    message is ``http.disconnect``, as Starlette's ``StreamingResponse`` listens for it."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(
    request: Request, gateway: Gateway, job_id: str, wait: Awaitable[T]
) -> T | None:
    """``await wait`` unless the client leaves first: then the wait is cancelled, the job
    too, and the answer is None."""
    done: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await _disconnected(request)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            done.append(await wait)
        except Exception as error:  # raised below, not wrapped in the task group's
            failed.append(error)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if done:
        return done[0]
    await _cancel(gateway, job_id)
    return None


class _Watched:
    """A response body that knows whether the client was given all of it."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body
        self.whole = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._body:
            yield part
        self.whole = True


def _line(chunk: dict[str, Any]) -> bytes:
    return json.dumps(chunk, separators=(",", ":")).encode()


async def _ndjson(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """One JSON object a line, as Ollama streams."""
    async for chunk in chunks:
        yield _line(chunk) + b"\n"


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events ending in ``data: [DONE]`` (none after an error), as OpenAI
    streams."""
    failed = False
    async for chunk in chunks:
        failed = "error" in chunk
        yield b"data: " + _line(chunk) + b"\n\n"
    if not failed:
        yield b"data: [DONE]\n\n"


async def _sse_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events named by each chunk's ``type``, as OpenAI's Responses API streams
    (no ``[DONE]``)."""
    async for chunk in chunks:
        yield f"event: {chunk['type']}\n".encode() + b"data: " + _line(chunk) + b"\n\n"


NDJSON = Framing("application/x-ndjson", _ndjson)
SSE = Framing("text/event-stream", _sse)
SSE_EVENTS = Framing("text/event-stream", _sse_events)
