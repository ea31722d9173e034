"""The jobs a gateway queued, for a client that asks about them later (``GET /jobs/{id}``):
a queued job leaves no other trace a reader can find before a worker starts it (RabbitMQ
cannot be searched for a message, Celery's result says PENDING for a queued job and an unknown
id alike, ``ml_results`` has no row yet); and the API keys a job belongs to, which alone may
read or cancel it (``ownership``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from avocado_shared.contracts import JobKind

__all__ = ["Ledger", "Noted"]


@dataclass(frozen=True)
class Noted:
    """What the ledger knows of a job: its kind, the share id of a summary, and the queue it
    was published to."""

    kind: JobKind
    share_id: str | None = None
    queue: str | None = None


class Ledger:
    """One Redis key per job, ``{prefix}infer:job:<id>``, and the set of the names of the keys
    it belongs to, ``{prefix}infer:owners:<id>``, both expiring with Celery's results."""

    def __init__(self, client: redis.Redis, key_prefix: str, ttl_s: int) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s

    def _key(self, job_id: str) -> str:
        return f"{self.key_prefix}infer:job:{job_id}"

    def _owners(self, job_id: str) -> str:
        return f"{self.key_prefix}infer:owners:{job_id}"

    def note(
        self,
        job_id: str,
        kind: JobKind,
        share_id: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
    ) -> None:
        """Remember a job just published to ``queue`` (or found running under its singleton
        lock), and that it belongs to the key named ``owner`` too (a summary's singleton hands
        one job to every key that asks for its share)."""
        data = json.dumps({"kind": kind.value, "share_id": share_id, "queue": queue})
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self._key(job_id), data, ex=self.ttl_s)
            if owner is not None:
                pipe.sadd(self._owners(job_id), owner)
                pipe.expire(self._owners(job_id), self.ttl_s)
            pipe.execute()

    def owned_by(self, job_id: str, owner: str) -> bool:
        """Whether the key named ``owner`` queued ``job_id`` through a gateway."""
        return bool(self.client.sismember(self._owners(job_id), owner))

    def get(self, job_id: str) -> Noted | None:
        """What was noted of ``job_id``; None for a job no gateway queued."""
        raw = self.client.get(self._key(job_id))
        if raw is None:
            return None
        data = json.loads(raw)
        return Noted(JobKind(data["kind"]), data.get("share_id"), data.get("queue"))
