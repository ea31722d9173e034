"""How many jobs wait in one lane queue of a model, cheaply and never too many: the broker's
count (a passive declare's ``message_count``: jobs not yet delivered to a worker) read at most
once a second, plus the jobs this gateway published since, as an estimate that lets a job in
without asking the broker; a job is refused only on the broker's own count, read again for it
(unless a read a quarter of a second old at most follows this gateway's last publish), so a
fleet that keeps up is never refused for the jobs its workers already took. Approximate: other
producers' jobs of the last second are missed, and so are jobs delivered but not yet
acknowledged."""

from __future__ import annotations

import logging
import threading
import time

from amqp.exceptions import NotFound

from avocado_shared.producer import Producer

__all__ = ["Backlog"]

logger = logging.getLogger(__name__)

_FRESH_S = 1.0
# How old the broker's count may be when it refuses a job.
_REFUSING_S = 0.25


class Backlog:
    """A queue's depth as this gateway last learnt it."""

    def __init__(self, producer: Producer, queue: str, timeout_s: float) -> None:
        self.queue = queue
        self._producer = producer
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._read_at = -_FRESH_S
        self._ready: int | None = None  # the broker's count at its last read
        self._published = 0  # jobs this gateway queued since

    def fresh(self) -> bool:
        """Whether ``estimate`` would answer without asking the broker."""
        return time.monotonic() - self._read_at < _FRESH_S

    def estimate(self, *, read: bool = True) -> int | None:
        """The jobs waiting, counting this gateway's since the last read, or None when the
        broker could not say (publishing will tell); without ``read``, from the last read,
        however old."""
        with self._lock:
            if read and not self.fresh():
                self._read()
            return None if self._ready is None else self._ready + self._published

    def confirmed(self) -> int | None:
        """The broker's own count, what a refusal rests on: read again unless the last read
        is a quarter of a second old at most and this gateway queued nothing since."""
        with self._lock:
            if self._published or time.monotonic() - self._read_at >= _REFUSING_S:
                self._read()
            return self._ready

    def published(self) -> None:
        """Count a job this gateway just queued, until the next read counts it."""
        with self._lock:
            self._published += 1

    def _read(self) -> None:
        """Ask the broker (call with the lock held)."""
        self._ready = self._message_count()
        self._read_at = time.monotonic()
        self._published = 0

    def _message_count(self) -> int | None:
        try:
            with self._producer.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=self._timeout_s)
                declared = connection.default_channel.queue_declare(self.queue, passive=True)
                return int(declared.message_count)
        except NotFound:  # not declared yet: the first job declares it
            return 0
        except Exception as error:  # kombu wraps socket, AMQP and auth errors alike
            logger.debug("the depth of %s is unknown: %s", self.queue, error)
            return None
