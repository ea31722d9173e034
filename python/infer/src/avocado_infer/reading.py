"""A job's answer read from its token stream as the worker writes it: text pieces, then its
``Ending`` (its ``Usage`` and the tool calls the model made). Redis may fail under a reader
(restarted, a network blip): the reader waits for it and goes on after the last entry it read;
while it waits, and until the stream moves again, it also looks at the job's stored result, and
once the job has one, gives the rest of the answer from it (a worker whose stream writes failed
goes on and stores its whole answer). A stream whose end says it holds more text than was read
lost entries (Redis can lose its last writes when it dies): the rest comes from the stored
answer too. The client sees a pause, not an error."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from avocado_infer.errors import AnswerRestarted
from avocado_infer.gateway import Gateway, StoredAnswer
from avocado_shared.contracts import ToolCall, Usage
from avocado_shared.streams import EntryKind, StreamFailed, StreamTimedOut, StreamUnavailable

__all__ = ["Ending", "answer_pieces", "whole_answer"]

logger = logging.getLogger(__name__)

# While recovering, how long one read of the stream waits before the stored result is looked
# at again, and the wait before reading again after Redis failed.
_SLICE_S = 1.0
_BACKOFF_S = 0.5
# How often, and how long, a reader looks for a stored answer its worker is about to write.
_STORED_POLL_S = 0.1
_STORED_WAIT_S = 30.0


@dataclass(frozen=True)
class Ending:
    """How an answer ended: what it cost and the tools the model called (whole: a stream
    carries them in its final entry)."""

    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class _Restart:
    """The answer starts over here (its job was redelivered to a server that cannot continue
    it): the text read before is void."""

    reason: str


_Read = str | Ending | _Restart


async def _read(
    gateway: Gateway, job_id: str, model: str, timeout_s: float
) -> AsyncIterator[_Read]:
    """The stream's text pieces, restarts and, last, the ending. ``StreamFailed`` when the job
    failed, ``StreamTimedOut`` after ``timeout_s`` with neither a new entry nor a result."""
    stream = gateway.stream(job_id)
    after = "0-0"
    given: list[str] = []  # the text read since the last restart: the stored answer's start
    recovering = False  # Redis failed once: the stored result is looked at between reads
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async for entry in stream.entries(after, _SLICE_S if recovering else timeout_s):
                after, deadline = entry.id, time.monotonic() + timeout_s
                if entry.kind is EntryKind.TEXT and entry.text:
                    given.append(entry.text)
                    yield entry.text
                elif entry.kind is EntryKind.RESTART:
                    given.clear()
                    yield _Restart(entry.reason or "")
                elif entry.kind is EntryKind.DONE:
                    # A stream shorter than its writer says lost entries (Redis can lose its
                    # last writes when it dies): the stored answer, written next, is whole.
                    gap = entry.length is not None and entry.length != sum(map(len, given))
                    stored = await _stored_soon(gateway, job_id) if gap else None
                    if stored is not None:
                        async for read in _rest(stored, "".join(given), job_id):
                            yield read
                    else:
                        yield Ending(entry.usage or Usage(model=model), entry.tool_calls)
                    return
                elif entry.kind is EntryKind.ERROR:
                    raise entry.failure(job_id)
        except StreamUnavailable as error:
            if not recovering:
                logger.warning("job %s: waiting for Redis to read on: %s", job_id, error)
            recovering = True
            await anyio.sleep(_BACKOFF_S)
        except StreamTimedOut:
            if not recovering:
                raise
        if recovering:
            stored = await gateway.stored(job_id)
            if stored is not None:
                async for read in _rest(stored, "".join(given), job_id):
                    yield read
                return
        if time.monotonic() > deadline:
            raise StreamTimedOut(
                f"no entry in stream for job {job_id} in {timeout_s}s, and no stored result"
            )


async def _rest(stored: StoredAnswer, given: str, job_id: str) -> AsyncIterator[_Read]:
    """What the stored answer holds beyond the text already given out, then its ending."""
    if not stored.text.startswith(given):  # cannot be: the result is what was streamed
        logger.warning("job %s: its stored answer does not begin with what was read", job_id)
    if len(stored.text) > len(given):
        yield stored.text[len(given) :]
    yield Ending(stored.usage, stored.tool_calls)


async def _stored_soon(gateway: Gateway, job_id: str) -> StoredAnswer | None:
    """The stored answer of a job whose stream just ended whole: its worker stores it right
    after; None if it is not there soon (the stream's answer is then the one given)."""
    deadline = time.monotonic() + _STORED_WAIT_S
    while (stored := await gateway.stored(job_id)) is None and time.monotonic() < deadline:
        await anyio.sleep(_STORED_POLL_S)
    return stored


async def answer_pieces(
    gateway: Gateway, job_id: str, model: str, timeout_s: float
) -> AsyncIterator[str | Ending]:
    """The answer's text pieces as they are written, then its ``Ending``. Raises
    ``StreamFailed`` when the job failed, ``AnswerRestarted`` when it started over after text
    was given out, ``StreamTimedOut`` after ``timeout_s`` without a new entry."""
    given = False
    async for read in _read(gateway, job_id, model, timeout_s):
        if isinstance(read, _Restart):
            if given:
                raise AnswerRestarted(
                    f"job {job_id} started its answer over on another worker ({read.reason}); "
                    "its stored result is the new answer"
                )
            continue
        given = given or isinstance(read, str)
        yield read


async def whole_answer(
    gateway: Gateway, job_id: str, model: str, timeout_s: float
) -> tuple[str, Ending]:
    """The whole answer as stored (a restart drops what came before it) and its ending."""
    parts: list[str] = []
    async for read in _read(gateway, job_id, model, timeout_s):
        if isinstance(read, Ending):
            return "".join(parts), read
        if isinstance(read, _Restart):
            parts.clear()
        else:
            parts.append(read)
    raise StreamFailed(f"job {job_id}: its answer ended without its usage")  # unreachable
