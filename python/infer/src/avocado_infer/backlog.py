"""How many jobs wait in ``ml.generate``, cheaply: the broker's count (a passive declare's
``message_count``, jobs not yet delivered to a worker) read at most once a second, plus the jobs
this gateway published since. Approximate: other producers' jobs of the last second are
missed, and so are jobs delivered but not yet acknowledged."""

from __future__ import annotations

import logging
import threading
import time

from amqp.exceptions import NotFound

from avocado_shared.producer import Producer
from avocado_shared.topology import GENERATE_QUEUE

__all__ = ["Backlog"]

logger = logging.getLogger(__name__)

_FRESH_S = 1.0


class Backlog:
    """The generate queue's depth as this gateway last learnt it."""

    def __init__(self, producer: Producer, timeout_s: float) -> None:
        self._producer = producer
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._read_at = -_FRESH_S
        self._depth: int | None = None

    def fresh(self) -> bool:
        """Whether ``depth`` would answer without asking the broker."""
        return time.monotonic() - self._read_at < _FRESH_S

    def depth(self, *, read: bool = True) -> int | None:
        """The jobs waiting, or None when the broker could not say (publishing will tell);
        without ``read``, what the last read said, however old."""
        with self._lock:
            if read and not self.fresh():
                self._depth = self._read()
                self._read_at = time.monotonic()
            return self._depth

    def published(self) -> None:
        """Count a job this gateway just queued, until the next read counts it."""
        with self._lock:
            if self._depth is not None:
                self._depth += 1

    def _read(self) -> int | None:
        try:
            with self._producer.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=self._timeout_s)
                declared = connection.default_channel.queue_declare(GENERATE_QUEUE, passive=True)
                return int(declared.message_count)
        except NotFound:  # not declared yet: the first job declares it
            return 0
        except Exception as error:  # kombu wraps socket, AMQP and auth errors alike
            logger.debug("the generate queue's depth is unknown: %s", error)
            return None
