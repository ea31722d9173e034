"""Token streams: a running generation's text, chunk by chunk, in one Redis stream per job.

The worker appends to ``{prefix}stream:{job_id}`` as it reads its inference server; a gateway
reads it with ``JobStream`` (redis only, nothing of the worker). Entries, oldest first:

- ``{"t": text}``: the next piece of the answer (with ``"n": count`` when it joins that many
  chunks of the server's, written together in a burst);
- ``{"restart": reason}``: the answer starts over (a redelivered job whose server cannot
  continue a partial answer): the text read before it is void;
- ``{"end": "done", "usage": json, "length": n, "tools": json}``: the answer is whole;
  ``usage`` is its ``Usage``, ``length`` how many characters of text the stream holds after its
  last restart (a reader that counts fewer knows the stream lost some: Redis can lose its last
  writes), ``tools`` (when the model called any) its ``ToolCall`` list. Tool calls travel in
  the end entry, whole: a stream never holds half a call, so a worker that dies before the end
  leaves nothing of its calls for a reader to have given out;
- ``{"end": "error", "error": reason}``: the job failed for good.

A reader ends at the first ``end`` entry. The worker gives the key a TTL
(``AVOCADO_STREAM_TTL_S``); a stream survives its worker, so a redelivered job continues it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis
import redis.asyncio
from pydantic import TypeAdapter

from avocado_shared.contracts import ToolCall, Usage
from avocado_shared.errors import PermanentError, TransientError, Unavailable

__all__ = [
    "AsyncJobStream",
    "EntryKind",
    "JobRefused",
    "JobStream",
    "StreamEntry",
    "StreamFailed",
    "StreamSnapshot",
    "StreamTimedOut",
    "StreamUnavailable",
    "done_fields",
    "error_fields",
    "joined",
    "parse_entry",
    "restart_fields",
    "snapshot_of",
    "stream_key",
    "text_fields",
]

_TOOL_CALLS = TypeAdapter(list[ToolCall])

# One XREAD waits at most this long, so a client's socket timeout never cuts a wait short.
_BLOCK_SLICE_MS = 1000


class EntryKind(str, Enum):
    """What one stream entry says."""

    TEXT = "text"
    RESTART = "restart"
    DONE = "done"
    ERROR = "error"


class StreamTimedOut(TransientError):
    """No entry came within the reader's timeout: the job waits in the queue, or its worker
    died and the job waits for redelivery."""


class StreamFailed(PermanentError):
    """The job's stream ended with an error: the job failed for good."""


class JobRefused(StreamFailed):
    """The job failed because its inference server refused its request (invalid there, or
    asking what its model cannot do): the client's request is at fault, not the fleet."""


class StreamUnavailable(Unavailable):
    """Redis could not be read."""


@dataclass(frozen=True)
class StreamEntry:
    """One entry: ``text`` for TEXT (``chunks``: how many of the server's chunks it joins),
    ``usage``, ``length`` (None from writers that did not say) and ``tool_calls`` for DONE,
    ``reason`` for RESTART and ERROR, ``refused`` for an ERROR whose server refused the
    request."""

    id: str
    kind: EntryKind
    text: str = ""
    chunks: int = 0
    usage: Usage | None = None
    length: int | None = None
    reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    refused: bool = False

    @property
    def final(self) -> bool:
        """True for the entry that ends the stream."""
        return self.kind in (EntryKind.DONE, EntryKind.ERROR)

    def failure(self, job_id: str) -> StreamFailed:
        """What an ERROR entry of ``job_id``'s stream raises."""
        kind = JobRefused if self.refused else StreamFailed
        return kind(f"job {job_id} failed: {self.reason}")


@dataclass(frozen=True)
class StreamSnapshot:
    """What a job's stream holds now: the answer so far (after the last restart), how many
    of the server's chunks made it, the last entry's id, and the final entry if it ended."""

    text: str = ""
    chunks: int = 0
    last_id: str = "0-0"
    end: StreamEntry | None = None


def stream_key(key_prefix: str, job_id: str) -> str:
    """The Redis key of ``job_id``'s stream."""
    return f"{key_prefix}stream:{job_id}"


def text_fields(text: str, chunks: int = 1) -> dict[str, str]:
    """A TEXT entry: ``text`` joins ``chunks`` of the server's chunks."""
    return {"t": text} if chunks == 1 else {"t": text, "n": str(chunks)}


def restart_fields(reason: str) -> dict[str, str]:
    """A RESTART entry: the text before it is void."""
    return {"restart": reason}


def done_fields(
    usage: Usage, length: int | None = None, tool_calls: Sequence[ToolCall] = ()
) -> dict[str, str]:
    """The final entry of a whole answer: what it cost, when known the length of the text it
    holds, and the tool calls the model made."""
    fields = {"end": EntryKind.DONE.value, "usage": usage.model_dump_json()}
    if length is not None:
        fields["length"] = str(length)
    if tool_calls:
        fields["tools"] = _TOOL_CALLS.dump_json(list(tool_calls)).decode()
    return fields


def error_fields(reason: str, refused: bool = False) -> dict[str, str]:
    """The final entry of a job that failed for good; ``refused``: because its server
    refused the request."""
    fields = {"end": EntryKind.ERROR.value, "error": reason}
    return fields | {"refused": "1"} if refused else fields


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_entry(entry_id: bytes | str, fields: Mapping[Any, Any]) -> StreamEntry:
    """An entry as Redis returns it (bytes or str, whichever the client decodes to)."""
    data = {_text(k): _text(v) for k, v in fields.items()}
    ident = _text(entry_id)
    if "t" in data:
        return StreamEntry(ident, EntryKind.TEXT, text=data["t"], chunks=int(data.get("n", 1)))
    if "restart" in data:
        return StreamEntry(ident, EntryKind.RESTART, reason=data["restart"])
    if data.get("end") == EntryKind.DONE.value:
        usage = Usage.model_validate_json(data["usage"])
        length = int(data["length"]) if "length" in data else None
        calls = tuple(_TOOL_CALLS.validate_json(data["tools"])) if "tools" in data else ()
        return StreamEntry(ident, EntryKind.DONE, usage=usage, length=length, tool_calls=calls)
    reason = data.get("error", "unknown failure")
    return StreamEntry(ident, EntryKind.ERROR, reason=reason, refused="refused" in data)


def _unreadable(job_id: str, error: redis.RedisError) -> StreamUnavailable:
    """Redis failed a read; the message names the job, not the fleet's key names."""
    return StreamUnavailable(f"the token stream of job {job_id} is not readable: {error}")


def _parsed(raw: Any) -> list[StreamEntry]:
    """Entries as XRANGE lists them (and as XREAD does, per stream)."""
    return [parse_entry(ident, fields) for ident, fields in raw or []]


def snapshot_of(raw: Any) -> StreamSnapshot:
    """What a stream holds, from its entries as XRANGE lists them."""
    entries = _parsed(raw)
    end = next((e for e in entries if e.final), None)
    if end is not None:
        entries = entries[: entries.index(end) + 1]
    restarts = [i for i, e in enumerate(entries) if e.kind is EntryKind.RESTART]
    live = entries[restarts[-1] + 1 :] if restarts else entries
    return StreamSnapshot(
        text=joined(live),
        chunks=sum(e.chunks for e in live),
        last_id=entries[-1].id if entries else "0-0",
        end=end,
    )


def joined(entries: Iterable[StreamEntry]) -> str:
    """The answer the entries make: the text after the last restart."""
    parts: list[str] = []
    for entry in entries:
        if entry.kind is EntryKind.RESTART:
            parts.clear()
        elif entry.kind is EntryKind.TEXT:
            parts.append(entry.text)
    return "".join(parts)


class _Cursor:
    """A reader's place in a stream: what its next XREAD asks (up to 512 entries after the
    last one read, blocking at most a slice of the time left) and the entries an answer
    holds, up to the final one; waiting ``timeout_s`` for nothing is ``StreamTimedOut``."""

    def __init__(self, key: str, job_id: str, after: str, timeout_s: float) -> None:
        self.key, self.job_id, self.last, self.timeout_s = key, job_id, after, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.done = False

    def read(self) -> dict[str, Any]:
        """The next XREAD's arguments."""
        left_ms = int((self.deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise StreamTimedOut(
                f"no entry in stream for job {self.job_id} in {self.timeout_s}s: it waits in "
                "the queue, or for another worker"
            )
        return {
            "streams": {self.key: self.last},
            "count": 512,
            "block": min(left_ms, _BLOCK_SLICE_MS),
        }

    def take(self, answer: Any) -> Iterator[StreamEntry]:
        for _key, raw in answer or []:
            for entry in _parsed(raw):
                yield entry
                if entry.final:
                    self.done = True
                    return
                self.last = entry.id
            self.deadline = time.monotonic() + self.timeout_s


class JobStream:
    """One job's stream on a Redis client the caller owns (any decoding)."""

    def __init__(self, client: redis.Redis, key_prefix: str, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self.key = stream_key(key_prefix, job_id)

    def snapshot(self) -> StreamSnapshot:
        """Everything written so far, in one read."""
        try:
            return snapshot_of(self.client.xrange(self.key))
        except redis.RedisError as error:
            raise _unreadable(self.job_id, error) from error

    def entries(self, after: str = "0-0", timeout_s: float = 60.0) -> Iterator[StreamEntry]:
        """Each entry after ``after`` (an entry id; the start by default) as soon as it is
        written, up to and including the final one. ``StreamTimedOut`` when ``timeout_s``
        pass without a new entry; the key need not exist yet (the job may still be queued)."""
        cursor = _Cursor(self.key, self.job_id, after, timeout_s)
        while not cursor.done:
            try:
                answer = self.client.xread(**cursor.read())
            except redis.RedisError as error:
                raise _unreadable(self.job_id, error) from error
            yield from cursor.take(answer)

    def text(self, after: str = "0-0", timeout_s: float = 60.0) -> str:
        """The whole answer once the stream ends; ``StreamFailed`` when the job failed."""
        seen: list[StreamEntry] = []
        for entry in self.entries(after, timeout_s):
            if entry.kind is EntryKind.ERROR:
                raise entry.failure(self.job_id)
            seen.append(entry)
        return joined(seen)


class AsyncJobStream:
    """``JobStream.entries`` on an asyncio Redis client: a reader on an event loop waits for
    the next entry without a thread of its own."""

    def __init__(self, client: redis.asyncio.Redis, key_prefix: str, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self.key = stream_key(key_prefix, job_id)

    async def entries(
        self, after: str = "0-0", timeout_s: float = 60.0
    ) -> AsyncIterator[StreamEntry]:
        """As ``JobStream.entries``."""
        cursor = _Cursor(self.key, self.job_id, after, timeout_s)
        while not cursor.done:
            try:
                answer = await self.client.xread(**cursor.read())
            except redis.RedisError as error:
                raise _unreadable(self.job_id, error) from error
            for entry in cursor.take(answer):
                yield entry
