"""The jobs a gateway queued for a client that asks about them later (``POST
/jobs/summarize``): a queued job leaves no other trace a reader can find before a worker
starts it (RabbitMQ cannot be searched for a message, Celery's result says PENDING for a
queued job and an unknown id alike, ``ml_results`` has no row yet)."""

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
    """One Redis key per job, ``{prefix}infer:job:<id>``, expiring with Celery's results."""

    def __init__(self, client: redis.Redis, key_prefix: str, ttl_s: int) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s

    def _key(self, job_id: str) -> str:
        return f"{self.key_prefix}infer:job:{job_id}"

    def note(
        self,
        job_id: str,
        kind: JobKind,
        share_id: str | None = None,
        queue: str | None = None,
    ) -> None:
        """Remember a job just published to ``queue`` (or found running under its singleton
        lock)."""
        data = json.dumps({"kind": kind.value, "share_id": share_id, "queue": queue})
        self.client.set(self._key(job_id), data, ex=self.ttl_s)

    def get(self, job_id: str) -> Noted | None:
        """What was noted of ``job_id``; None for a job no gateway queued."""
        raw = self.client.get(self._key(job_id))
        if raw is None:
            return None
        data = json.loads(raw)
        return Noted(JobKind(data["kind"]), data.get("share_id"), data.get("queue"))
