"""A generation's chunks appended to its job's token stream (``avocado_shared.streams``).

A chunk that comes when the stream is idle is written at once by the job's own thread (one
round trip, no wait for another thread to get the GIL), so the first token is never held
back. Chunks that come in a burst (within a millisecond of the last write, or while one is
on the wire) go to a writer thread, which sends all that waits in one pipeline, consecutive
chunks joined in one entry: with a distant Redis (a notebook's ``rediss://``) the job never
spends a round trip per token, and a fast server costs one entry per burst. A
stream is best effort: when Redis fails, the job goes on and its result is stored as ever; a
reader then times out and reads the result.
"""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from avocado_shared.cancel import JobCancelled
from avocado_shared.streams import text_fields

__all__ = ["TokenStream"]

logger = logging.getLogger(__name__)

_Fields = dict[str, str]
_Item = str | _Fields  # a chunk of text, or another entry

# A chunk this soon after the last write is part of a burst: it goes to the writer thread.
_BURST_S = 0.001
# How long ``close`` waits for the writer thread (each write is bounded by the client's
# socket timeout anyway).
_CLOSE_WAIT_S = 30.0


class TokenStream:
    """The writer of one job's stream, used from the job's thread; ``close`` it once, with
    the final entry or none."""

    def __init__(self, client: Redis, key: str, ttl_s: int, cancel_key: str | None = None) -> None:
        self.key = key
        self._cancel_key = cancel_key
        self._cancelled = False  # the job's cancel flag was seen set
        self._client = client
        self._ttl_s = ttl_s
        self._pending: list[_Item] = []
        self._sending = False  # the writer thread has a batch on the wire
        self._closing = False
        self._broken = False
        self._written = 0
        self._last_write = 0.0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None  # started by the first burst

    def append(self, text: str) -> None:
        """The next piece of the answer (empty pieces are left out); ``JobCancelled`` once a
        write found the job's cancel flag set, which ends the generation's HTTP stream."""
        if text:
            self._put(text)
        if self._cancelled:
            raise JobCancelled("cancelled on request while it generated")

    def add(self, fields: _Fields) -> None:
        """An entry of another kind (a restart marker)."""
        self._put(fields)

    def close(self, final: _Fields | None = None) -> None:
        """Write ``final`` (the ``end`` entry; none when the job will be retried) after all
        that came before it, and stop the writer thread."""
        with self._cond:
            self._closing = True  # set with ``final`` queued, so the thread cannot miss it
            inline = final is not None and not self._broken and self._idle()
            if final is not None and not inline:
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

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._broken:
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

    def _write(self, batch: list[_Item]) -> None:
        """One round trip for the batch; the TTL set with the first write and the last."""
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for fields in _entries(batch):
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
                self._pending.clear()
            return
        self._written += len(batch)
        self._last_write = time.monotonic()
        if self._cancel_key is not None and replies[-1]:
            self._cancelled = True


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
