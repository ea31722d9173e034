"""Leases on job ids in Redis, so two copies of one job never run at once.

A job id can arrive more than once: a producer in another language may publish a job again
after a timed-out confirm, and RabbitMQ redelivers a job whose ack was lost with its
connection (the threads pool acks on the connection that may just have dropped). A job runs
only under a lease on its id, refreshed while it runs; a copy that finds the lease taken comes
back after it would expire; a worker that died holding one delays its job's redelivery by at
most ``job_lease_s``. (A copy of a job that already succeeded is answered from its row:
``results.started``.)

Celery's ``worker_deduplicate_successful_tasks`` does neither: it looks only at redelivered
messages, not at copies, and in the result backend, which expires.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from avocado_shared.errors import TransientError
from avocado_shared.locks import REFRESH_SCRIPT, RELEASE_SCRIPT

__all__ = ["AlreadyRunning", "Begun", "Leases"]

logger = logging.getLogger(__name__)


class AlreadyRunning(TransientError):
    """Another copy of this job id holds its lease; this copy waits its turn."""

    def __init__(self, job_id: str, retry_in: int) -> None:
        super().__init__(
            f"job {job_id} is running elsewhere; this copy is back in {retry_in}s", retry_in
        )
        self.job_id = job_id
        self.retry_in = retry_in

    def __reduce__(self) -> tuple[type[AlreadyRunning], tuple[str, int]]:
        """Pickled as itself: Celery's retry keeps only exceptions that survive pickling, and
        would hand ``on_retry`` a plain TransientError in its place."""
        return AlreadyRunning, (self.job_id, self.retry_in)


@dataclass(frozen=True)
class Begun:
    """What a job found as it took its lease, read in the same round trip: whether its cancel
    flag is set, and its token stream's entries (None: not asked for, or not read)."""

    cancelled: bool = False
    stream: list[Any] | None = None


class Leases:
    """The leases of one worker's jobs, and one thread per process pushing back their
    expiry while the jobs run."""

    def __init__(self, key_prefix: str, lease_s: int) -> None:
        self.key_prefix = key_prefix
        self.lease_s = lease_s
        self._held: dict[str, tuple[Redis, str]] = {}  # key -> (client, token)
        self._lock = threading.Lock()
        self._pid = 0
        self._stop = threading.Event()

    @contextmanager
    def hold(
        self, client: Redis, job_id: str, cancel_key: str, stream_key: str | None = None
    ) -> Iterator[Begun]:
        """Hold the lease on ``job_id`` while the block runs, reading its cancel flag (and
        its stream at ``stream_key``) in the same round trip; ``AlreadyRunning`` when
        another copy holds it. With Redis down the job runs unguarded rather than not at
        all."""
        key = f"{self.key_prefix}run:{job_id}"
        token = uuid.uuid4().hex
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.set(key, token, nx=True, ex=self.lease_s)
                pipe.exists(cancel_key)
                if stream_key is not None:
                    pipe.xrange(stream_key)
                taken, cancelled, *stream = pipe.execute()
            left = None if taken else int(client.ttl(key))  # another copy runs: rare
        except RedisError as error:
            logger.warning("job %s runs without its lease or cancel flag: %s", job_id, error)
            yield Begun()
            return
        if left is not None:
            raise AlreadyRunning(job_id, max(1, left + 1))
        self._add(client, key, token)
        try:
            yield Begun(bool(cancelled), stream[0] if stream else None)
        finally:
            with self._lock:
                self._held.pop(key, None)
            try:
                client.eval(RELEASE_SCRIPT, 1, key, token)
            except RedisError as error:
                logger.warning("lease %s left to expire: %s", key, error)

    def close(self) -> None:
        """Stop refreshing (the worker is shutting down; held leases expire)."""
        self._stop.set()

    def _add(self, client: Redis, key: str, token: str) -> None:
        with self._lock:
            self._held[key] = (client, token)
            if self._pid != os.getpid():  # first lease here, or the pool forked since
                self._pid = os.getpid()
                threading.Thread(target=self._refresh, name="job-leases", daemon=True).start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                held = list(self._held.items())
            for key, (client, token) in held:
                try:
                    client.eval(REFRESH_SCRIPT, 1, key, token, self.lease_s)
                except RedisError as error:
                    logger.warning("lease %s not refreshed: %s", key, error)
