"""A generation's chunks appended to its job's token stream (``avocado_shared.streams``), from
where earlier attempts left it to its end.

A job redelivered after its worker died, or retried after a cut connection, continues the
answer its stream already holds, so a reader sees neither a repeat nor a gap. The stream is
a context manager that writes its own end: ``done`` with the usage, an error with the reason
the job failed, or none when the job will be retried (the next attempt continues it).

A chunk that comes when the stream is idle is written at once by the job's own thread (one
round trip, no wait for another thread to get the GIL), so the first token is never held
back. Chunks that come in a burst (within a millisecond of the last write, or while one is
on the wire) go to a writer thread, which sends all that waits in one pipeline, consecutive
chunks joined in one entry: with a distant Redis (a notebook's ``rediss://``) the job never
spends a round trip per token, and a fast server costs one entry per burst. A
stream is best effort: when a write fails, the job goes on and its result is stored as ever;
what could not be written is kept and written once more with the stream's end, so a Redis
that came back in the meantime gets the whole answer, never an end after a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from celery.exceptions import Retry
from redis import Redis
from redis.exceptions import RedisError

from avocado_shared.cancel import JobCancelled, cancel_key
from avocado_shared.contracts import ToolCall, Usage
from avocado_shared.streams import (
    EntryKind,
    JobStream,
    StreamSnapshot,
    StreamUnavailable,
    done_fields,
    error_fields,
    restart_fields,
    snapshot_of,
    text_fields,
)
from ollama_worker.inference import BackendRejected, Completion

__all__ = ["TokenStream", "TokenStreams", "failure_reason"]

logger = logging.getLogger(__name__)

_Fields = dict[str, str]
_Item = str | _Fields  # a chunk of text, or another entry

# A chunk this soon after the last write is part of a burst: it goes to the writer thread.
_BURST_S = 0.001
# How long ``close`` waits for the writer thread (each write is bounded by the client's
# socket timeout anyway).
_CLOSE_WAIT_S = 30.0


def failure_reason(error: BaseException) -> str:
    """How a job's failure reads in its stream's end and its row."""
    return f"{type(error).__name__}: {error}"


def _failure_fields(error: BaseException) -> _Fields:
    """The end of the stream of a job that failed for good with ``error``; one its server
    refused says so (the client's request, not the fleet, is at fault)."""
    return error_fields(failure_reason(error), isinstance(error, BackendRejected))


class TokenStreams:
    """The token streams of one worker's jobs: where they are, how long they live, and
    whether this server can continue a partial answer."""

    def __init__(
        self, client: Callable[[], Redis], key_prefix: str, ttl_s: int, resume: str
    ) -> None:
        """``client``: this process's Redis client for streams, looked up at each open."""
        self._client = client
        self._key_prefix = key_prefix
        self._ttl_s = ttl_s
        self._resume = resume

    def open(
        self, job_id: str, continuable: bool = True, entries: list[Any] | None = None
    ) -> TokenStream:
        """The job's stream writer, holding in ``streamed`` what earlier attempts streamed
        (``entries``: the stream as the job read it with its lease; else read here).

        A stream that ended in an error belonged to a run that is over (the job is run
        again): it starts afresh. One that cannot be read, or that this server cannot
        continue (``stream_resume=restart``), or whose answer cannot be (not
        ``continuable``: it may call tools), gets a restart entry: readers drop what came
        before it.
        """
        reader = JobStream(self._client(), self._key_prefix, job_id)
        cancel = cancel_key(self._key_prefix, job_id)
        stream = TokenStream(reader.client, reader.key, self._ttl_s, cancel)
        try:
            streamed = reader.snapshot() if entries is None else snapshot_of(entries)
            if streamed.end is not None and streamed.end.kind is EntryKind.ERROR:
                reader.client.delete(reader.key)
                streamed = StreamSnapshot()
            stream.last_id = streamed.last_id
        except (StreamUnavailable, RedisError) as error:
            logger.warning("job %s: stream not readable, the answer starts over: %s", job_id, error)
            stream.add(restart_fields(f"stream not readable: {error}"))
            return stream
        if streamed.text and self._resume == "restart":
            stream.add(restart_fields("the inference server cannot continue a partial answer"))
            return stream
        if streamed.text and streamed.end is None and not continuable:
            stream.add(restart_fields("an answer that may call tools cannot be continued"))
            return stream
        if streamed.text:
            logger.info("job %s continues its streamed answer (%d chunks)", job_id, streamed.chunks)
        stream.streamed = streamed
        return stream

    def end_if_open(self, job_id: str, error: BaseException) -> None:
        """End the job's stream with ``error`` unless a run of it did: a job refused before
        it ran (cancelled while queued) or failed outside its generation, so that a reader
        (the gateway) stops waiting now instead of at its timeout. Best effort: Redis may be
        down."""
        reader = JobStream(self._client(), self._key_prefix, job_id)
        try:
            if reader.snapshot().end is None:
                TokenStream(reader.client, reader.key, self._ttl_s).close(_failure_fields(error))
        except (StreamUnavailable, RedisError) as unwritten:
            why = failure_reason(error)
            logger.warning("job %s: its stream not ended (%s): %s", job_id, why, unwritten)


class TokenStream:
    """The writer of one job's stream, used from the job's thread: ``close`` it once, with
    the final entry or none, or use it as a context manager, which ends it as the block
    ends (``done`` if ``finish`` was given the usage, the error the block raised, or nothing
    for a retry)."""

    def __init__(self, client: Redis, key: str, ttl_s: int, cancel_key: str | None = None) -> None:
        self.key = key
        self.streamed = StreamSnapshot()  # what earlier attempts wrote, to continue
        self._usage: Usage | None = None
        self._tool_calls: tuple[ToolCall, ...] = ()
        self._appended = 0  # characters of text appended by this attempt
        self._cancel_key = cancel_key
        self._cancelled = False  # the job's cancel flag was seen set
        self._client = client
        self._ttl_s = ttl_s
        self._pending: list[_Item] = []
        self._sending = False  # the writer thread has a batch on the wire
        self._closing = False
        self._broken = False  # a write failed: what follows waits in _missed for the end
        self._missed: list[_Item] = []
        # The entries of the write that failed: Redis may have taken some all the same.
        self._unsure: list[_Fields] = []
        # The stream's last entry as this writer knows it (None: unknown, an unreadable stream).
        self.last_id: str | None = None
        self._written = 0
        self._last_write = 0.0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None  # started by the first burst

    def append(self, text: str) -> None:
        """The next piece of the answer (empty pieces are left out); ``JobCancelled`` once a
        write found the job's cancel flag set, which ends the generation's HTTP stream."""
        if text:
            self._appended += len(text)
            self._put(text)
        if self._cancelled:
            raise JobCancelled("cancelled on request while it generated")

    def add(self, fields: _Fields) -> None:
        """An entry of another kind (a restart marker)."""
        self._put(fields)

    def earlier_answer(self) -> Completion | None:
        """The answer an earlier attempt streamed to its end, when its worker died before
        storing it; None when there is more to generate."""
        end = self.streamed.end
        if end is None or end.usage is None:
            return None
        return Completion(self.streamed.text, end.usage, end.tool_calls)

    def finish(self, usage: Usage, tool_calls: Sequence[ToolCall] = ()) -> None:
        """The answer is whole: the stream ends ``done`` with ``usage`` and the model's
        ``tool_calls`` as the block ends."""
        self._usage = usage
        self._tool_calls = tuple(tool_calls)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if error is None:
            length = len(self.streamed.text) + self._appended
            done = (
                None if self._usage is None else done_fields(self._usage, length, self._tool_calls)
            )
            self.close(done)
        elif isinstance(error, Retry):
            self.close()  # the next attempt continues it
        else:
            self.close(_failure_fields(error))

    def close(self, final: _Fields | None = None) -> None:
        """Write ``final`` (the ``end`` entry; none when the job will be retried) after all
        that came before it, and stop the writer thread."""
        with self._cond:
            self._closing = True  # set with ``final`` queued, so the thread cannot miss it
            inline = final is not None and not self._broken and self._idle()
            if final is not None and self._broken:
                self._missed.append(final)
            elif final is not None and not inline:
                self._queue(final)
            self._cond.notify()
            thread = self._thread
        if inline:
            assert final is not None
            self._write([final])
        if thread is not None:
            thread.join(_CLOSE_WAIT_S)
            if thread.is_alive():
                logger.warning("stream %s: writes pending after %ss", self.key, _CLOSE_WAIT_S)
        if self._missed:
            self._write_missed()

    def _write_missed(self) -> None:
        """One more try at what failed to be written, in order, with the stream's end; of the
        failed write's entries, only those Redis did not take (no piece twice)."""
        taken = self._taken()
        entries = [*self._unsure[taken:], *_entries(self._missed)]
        self._unsure, self._missed = [], []
        if self._send(entries):
            logger.info("stream %s: the %d entries it missed are written", self.key, len(entries))

    def _taken(self) -> int:
        """How many entries of the failed write Redis took before the connection broke (it
        applies a pipeline's commands in order): those after the last entry this writer
        knows of; none when it knows of none, or cannot read now."""
        if not self._unsure or self.last_id is None:
            return 0
        try:
            after = self._client.xrange(self.key, min=f"({self.last_id}", count=len(self._unsure))
            taken = len(cast(list[Any], after))
        except RedisError:
            return 0
        return taken

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._broken:
                self._missed.append(item)
                return
            if not self._idle() or time.monotonic() - self._last_write < _BURST_S:
                self._queue(item)
                return
        # The writer thread is idle and only this thread queues: nothing can overtake this.
        self._write([item])

    def _queue(self, item: _Item) -> None:
        """Hand ``item`` to the writer thread (call with the lock held)."""
        self._pending.append(item)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"stream {self.key}")
            self._thread.daemon = True
            self._thread.start()
        self._cond.notify()

    def _idle(self) -> bool:
        """Nothing queued or on the wire (call with the lock held)."""
        return not self._pending and not self._sending

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closing)
                batch, self._pending = self._pending, []
                if not batch:
                    return  # closing, and nothing left
                self._sending = True
            self._write(batch)
            with self._cond:
                self._sending = False

    def _write(self, batch: list[_Item]) -> bool:
        """One round trip for the batch (its text joined into entries)."""
        return self._send(_entries(batch))

    def _send(self, entries: list[_Fields]) -> bool:
        """One round trip for ``entries``; the TTL set with the first write and the last. A
        write that fails, and all queued after it, are kept for the end."""
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for fields in entries:
                    pipe.xadd(self.key, fields)  # type: ignore[arg-type]
                if self._written == 0 or self._closing:
                    pipe.expire(self.key, self._ttl_s)
                if self._cancel_key is not None:  # in the same round trip
                    pipe.exists(self._cancel_key)
                replies = pipe.execute()
        except RedisError as error:
            logger.warning("stream %s not written, the job goes on: %s", self.key, error)
            with self._cond:
                self._broken = True
                self._unsure += entries
                self._missed += self._pending
                self._pending.clear()
            return False
        self._written += len(entries)
        if entries:
            last = replies[len(entries) - 1]
            self.last_id = last.decode() if isinstance(last, bytes) else str(last)
        self._last_write = time.monotonic()
        if self._cancel_key is not None and replies[-1]:
            self._cancelled = True
        return True


def _entries(batch: list[_Item]) -> list[_Fields]:
    """The batch as stream entries, each run of text chunks joined in one."""
    entries: list[_Fields] = []
    run: list[str] = []
    for item in [*batch, {}]:
        if isinstance(item, str):
            run.append(item)
            continue
        if run:
            entries.append(text_fields("".join(run), len(run)))
            run = []
        if item:
            entries.append(item)
    return entries
