"""A job's token stream relayed to an HTTP client: its text pieces as the worker writes them,
then the answer's counts; as NDJSON (Ollama) or server-sent events (OpenAI). A client that
goes away before its answer is out cancels the job, whether it was waiting for the whole
answer, for the first piece, or in the middle of the stream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from avocado_infer.errors import AnswerRestarted
from avocado_shared.contracts import Usage
from avocado_shared.errors import AvocadoError
from avocado_shared.streams import AsyncJobStream, EntryKind, StreamEntry, StreamFailed, joined

__all__ = [
    "JOB_ID_HEADER",
    "Piece",
    "Usage",
    "encoded",
    "left",
    "ndjson",
    "opened",
    "pieces",
    "sse",
    "unless_left",
    "whole",
]

logger = logging.getLogger(__name__)

# Names the job behind a response, for ``ml_results`` and ``avocado result``.
JOB_ID_HEADER = "X-Avocado-Job-Id"

# nginx's "client closed request": the status of an answer no one was left to read.
_CLIENT_LEFT = 499

T = TypeVar("T")


Piece = str | Usage
"""A piece of the answer's text, or, last, its usage."""


def _failed(stream: AsyncJobStream, entry: StreamEntry) -> StreamFailed:
    return StreamFailed(f"job {stream.job_id} failed: {entry.reason}")


async def pieces(stream: AsyncJobStream, model: str, timeout_s: float) -> AsyncIterator[Piece]:
    """The answer's text pieces as they are written, then its ``Usage``. Raises
    ``StreamFailed`` when the job failed, ``AnswerRestarted`` when it started over after
    text was given out, ``StreamTimedOut`` after ``timeout_s`` without a new entry."""
    given = False
    async for entry in stream.entries(timeout_s=timeout_s):
        if entry.kind is EntryKind.TEXT and entry.text:
            given = True
            yield entry.text
        elif entry.kind is EntryKind.RESTART and given:
            raise AnswerRestarted(
                f"job {stream.job_id} started its answer over on another worker "
                f"({entry.reason}); its stored result is the new answer"
            )
        elif entry.kind is EntryKind.DONE:
            yield entry.usage or Usage(model=model)
        elif entry.kind is EntryKind.ERROR:
            raise _failed(stream, entry)


async def whole(stream: AsyncJobStream, model: str, timeout_s: float) -> tuple[str, Usage]:
    """The whole answer as stored (a restart drops what came before it) and its usage."""
    seen: list[StreamEntry] = []
    async for entry in stream.entries(timeout_s=timeout_s):
        if entry.kind is EntryKind.ERROR:
            raise _failed(stream, entry)
        seen.append(entry)
    return joined(seen), seen[-1].usage or Usage(model=model)


async def _cancel(cancel: Callable[[], None], job_id: str) -> None:
    """``cancel`` the job of a client that left; a failure to is logged, not raised."""
    try:
        await run_in_threadpool(cancel)
    except AvocadoError as error:
        logger.warning("job %s not cancelled after its client left: %s", job_id, error)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away. Its body was read whole: the server's next
    message is ``http.disconnect``, as Starlette's ``StreamingResponse`` listens for it."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_left(
    request: Request, wait: Callable[[], Awaitable[T]], job_id: str, cancel: Callable[[], None]
) -> T | None:
    """``await wait()`` unless the client leaves first: then the wait (an XREAD on the event
    loop) is cancelled, the job too (``cancel``), and the answer is None."""
    done: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await _disconnected(request)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            done.append(await wait())
        except Exception as error:  # raised below, not wrapped in the task group's
            failed.append(error)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if done:
        return done[0]
    await _cancel(cancel, job_id)
    return None


def left() -> Response:
    """What a route returns once its client has left (nobody reads it; logs and metrics do)."""
    return Response(status_code=_CLIENT_LEFT)


async def opened(
    request: Request, answer: AsyncIterator[Piece], job_id: str, cancel: Callable[[], None]
) -> AsyncIterator[Piece] | None:
    """``answer`` once its first piece is there: a job that fails or never starts gets an
    HTTP error status, as nothing was sent yet. None when the client left before (its job
    cancelled: queued, it never runs)."""
    first = await unless_left(request, lambda: anext(answer), job_id, cancel)
    if first is None:
        return None

    async def chained(first: Piece) -> AsyncIterator[Piece]:
        yield first
        async for piece in answer:
            yield piece

    return chained(first)


async def encoded(
    answer: AsyncIterator[Piece],
    chunk: Callable[[str], dict[str, Any]],
    final: Callable[[Usage], Iterable[dict[str, Any]]],
    failed: Callable[[AvocadoError], dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """The API's chunks for ``answer``; a failure once streaming ends it with ``failed``'s."""
    try:
        async for piece in answer:
            if isinstance(piece, Usage):
                for last in final(piece):
                    yield last
            else:
                yield chunk(piece)
    except AvocadoError as error:
        yield failed(error)


class _Watched:
    """A response body that knows whether the client was given all of it."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body
        self.whole = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._body:
            yield part
        self.whole = True


def _streamed(
    body: AsyncIterator[bytes], media_type: str, job_id: str, cancel: Callable[[], None]
) -> StreamingResponse:
    """``body`` streamed; a client that goes away before its end cancels the job
    (``cancel``), so its worker stops generating. Noticed at once: Starlette cancels the
    body's wait for the next piece when the client disconnects."""
    watched = _Watched(body)

    async def gone() -> None:
        if not watched.whole:
            await _cancel(cancel, job_id)

    return StreamingResponse(
        watched,
        media_type=media_type,
        headers={JOB_ID_HEADER: job_id},
        background=BackgroundTask(gone),
    )


def ndjson(
    chunks: AsyncIterator[dict[str, Any]], job_id: str, cancel: Callable[[], None]
) -> StreamingResponse:
    """One JSON object a line, as Ollama streams; ``cancel`` if the client leaves early."""
    lines = (json.dumps(c, separators=(",", ":")).encode() + b"\n" async for c in chunks)
    return _streamed(lines, "application/x-ndjson", job_id, cancel)


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    failed = False
    async for chunk in chunks:
        failed = "error" in chunk
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    if not failed:
        yield b"data: [DONE]\n\n"


def sse(
    chunks: AsyncIterator[dict[str, Any]], job_id: str, cancel: Callable[[], None]
) -> StreamingResponse:
    """Server-sent events ending in ``data: [DONE]`` (none after an error), as OpenAI streams;
    ``cancel`` if the client leaves early."""
    return _streamed(_events(chunks), "text/event-stream", job_id, cancel)
