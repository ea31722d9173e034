"""A generation's chunks appended to its job's token stream (``avocado_shared.streams``).

Writes go out from a thread of the stream's own, so the job never waits on Redis between two
chunks: the first chunk leaves at once, and those that come while a write is on the wire leave
together in the next pipeline. A stream is best effort: when Redis fails, the job goes on and
its result is stored as ever; a reader then times out and reads the result instead.
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError

from avocado_shared.streams import text_fields

__all__ = ["TokenStream"]

logger = logging.getLogger(__name__)

_Fields = dict[str, str]

# How long ``close`` waits for the last writes (Redis answers in well under a millisecond;
# a client socket timeout bounds each write anyway).
_CLOSE_WAIT_S = 30.0


class TokenStream:
    """The writer of one job's stream; ``close`` it once, with the final entry or none."""

    def __init__(self, client: Redis, key: str, ttl_s: int) -> None:
        self.key = key
        self._client = client
        self._ttl_s = ttl_s
        self._pending: list[_Fields] = []
        self._closing = False
        self._written = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"stream {key}", daemon=True)
        self._thread.start()

    def append(self, text: str) -> None:
        """Queue the next piece of the answer (empty pieces are left out)."""
        if text:
            self._put(text_fields(text))

    def add(self, fields: _Fields) -> None:
        """Queue an entry of another kind (a restart marker)."""
        self._put(fields)

    def close(self, final: _Fields | None = None) -> None:
        """Queue ``final`` (the ``end`` entry; none when the job will be retried), wait until
        everything queued is written, and stop the thread."""
        with self._cond:
            if final is not None:
                self._pending.append(final)
            self._closing = True
            self._cond.notify()
        self._thread.join(_CLOSE_WAIT_S)
        if self._thread.is_alive():
            logger.warning("stream %s: writes pending after %ss", self.key, _CLOSE_WAIT_S)

    def _put(self, fields: _Fields) -> None:
        with self._cond:
            self._pending.append(fields)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closing)
                batch, self._pending = self._pending, []
                closing = self._closing and not batch
            if closing:
                return
            if not self._write(batch):
                return

    def _write(self, batch: list[_Fields]) -> bool:
        """One round trip for the batch; the TTL set with the first write and the last."""
        last = self._closing
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for fields in batch:
                    pipe.xadd(self.key, fields)  # type: ignore[arg-type]
                if self._written == 0 or last:
                    pipe.expire(self.key, self._ttl_s)
                pipe.execute()
        except RedisError as error:
            logger.warning("stream %s not written, the job goes on: %s", self.key, error)
            return False
        self._written += len(batch)
        return True
