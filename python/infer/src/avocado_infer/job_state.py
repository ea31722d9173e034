"""What ``GET /jobs/{id}`` says of a job: its state, the worker that runs or ran it, its
attempts and, while it waits in the queue, how many jobs at most wait ahead of it.

Read as ``avocado result`` reads a job: its ``ml_results`` row first (its worker writes it at
each start, retry and end), then Celery's result (a summary's row goes to the share's newest
job, so an older job of the share has only its result), then the gateway's ledger, which
knows the jobs a gateway queued that no worker has started yet.

Jobs ahead: a RabbitMQ quorum queue cannot be peeked, so where a message stands in it is
known to no one. While the job is queued, every job ahead of it is one of the queue's ready
messages other than itself (``message_count`` less one), and so is every job behind it:
that number is an upper bound, exact only for the last job in line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from redis.exceptions import RedisError

from avocado_infer.ledger import Ledger, Noted
from avocado_shared.contracts import JobKind
from avocado_shared.errors import NotFound, Unavailable
from avocado_shared.producer import Producer
from avocado_shared.store import JobStatus, ResultRow, StoreRejected, job_key
from avocado_shared.topology import (
    EMBED_QUEUE,
    GENERATE_QUEUE,
    ML_EXCHANGE,
    SUMMARIZE_QUEUE,
    SUMMARIZE_TASK,
    job_queue,
)

__all__ = ["JobState", "JobStates", "JobUnknown", "JobView", "unknown_job", "unknown_summary"]

logger = logging.getLogger(__name__)


class JobState(str, Enum):
    """Where a job stands, as the gateway tells it."""

    QUEUED = "queued"
    STARTED = "started"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"


_FROM_ROW = {
    JobStatus.STARTED: JobState.STARTED,
    JobStatus.RETRY: JobState.RETRYING,
    JobStatus.SUCCESS: JobState.SUCCESS,
    JobStatus.FAILURE: JobState.FAILURE,
    JobStatus.CANCELLED: JobState.CANCELLED,
}
# Celery's states other than PENDING (queued and unknown alike, for it).
_FROM_CELERY = {
    "STARTED": JobState.STARTED,
    "RETRY": JobState.RETRYING,
    "SUCCESS": JobState.SUCCESS,
    "FAILURE": JobState.FAILURE,
    "REVOKED": JobState.CANCELLED,
}
# The queue of a job noted without one (by a gateway of an earlier release).
_QUEUES = {
    JobKind.GENERATE: GENERATE_QUEUE,
    JobKind.SUMMARIZE: SUMMARIZE_QUEUE,
    JobKind.EMBED: EMBED_QUEUE,
}


class JobUnknown(NotFound):
    """No worker has started the job and no gateway queued it, or the caller's key may not
    see it: both read the same, so a key learns nothing of other keys' jobs."""


def unknown_job(job_id: str) -> JobUnknown:
    return JobUnknown(
        f"job {job_id} is not known: no worker has started it and no gateway queued it, or "
        "another API key did (a job another producer queued is known once a worker starts it, "
        "to admin keys only)"
    )


def unknown_summary(share_id: str) -> JobUnknown:
    return JobUnknown(f"no summary job of share id {share_id!r} is known")


@dataclass(frozen=True)
class JobView:
    """A job as ``GET /jobs/{id}`` shows it; ``queue`` and ``jobs_ahead_at_most`` while it is
    queued (the bound None when the broker could not be asked)."""

    id: str
    state: JobState
    kind: JobKind | None = None
    share_id: str | None = None
    worker: str | None = None
    attempts: int | None = None
    error: str | None = None
    updated_at: datetime | None = None
    queue: str | None = None
    jobs_ahead_at_most: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": None if self.kind is None else self.kind.value,
            "share_id": self.share_id,
            "state": self.state.value,
            "worker": self.worker,
            "attempts": self.attempts,
            "error": self.error,
            "updated_at": None if self.updated_at is None else _iso(self.updated_at),
            "queue": self.queue,
            "jobs_ahead_at_most": self.jobs_ahead_at_most,
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _from_row(row: ResultRow) -> JobView:
    return JobView(
        id=row.job_id,
        state=_FROM_ROW[row.status],
        kind=JobKind(row.task_type),
        share_id=row.share_id,
        worker=row.worker,
        attempts=row.attempts,
        error=row.error,
        updated_at=row.updated_at,
    )


class JobStates:
    """Reads a job's state from ``ml_results``, Celery's result backend, the ledger and the
    broker; every call blocks (run it off the event loop)."""

    def __init__(self, producer: Producer, ledger: Ledger, broker_timeout_s: float) -> None:
        self.producer = producer
        self.ledger = ledger
        self.broker_timeout_s = broker_timeout_s

    def view(self, job_id: str, noted: Noted | None = None) -> JobView:
        """``job_id`` now; ``JobUnknown`` when nothing knows it. ``noted``: what the caller
        knows the job to be, instead of the ledger's word."""
        read = functools.partial(self.producer.results.get, job_id)
        row = self._stored(read)
        if row is not None:
            return _from_row(row)
        try:
            state = _FROM_CELERY.get(self.producer.handle(job_id).state)
            noted = noted or self.ledger.get(job_id)
        except RedisError as error:
            raise Unavailable(f"job {job_id}: Redis did not answer: {error}") from error
        # A worker writes a job's row before Celery's word of it: one that came in between
        # the two reads (a cancelled job's row says CANCELLED, Celery's FAILURE) wins.
        if state is not None and (row := self._stored(read)) is not None:
            return _from_row(row)
        kind, share_id = (noted.kind, noted.share_id) if noted else (None, None)
        if state is not None:
            return JobView(job_id, state, kind=kind, share_id=share_id)
        if kind is None:
            raise unknown_job(job_id)
        queue = noted.queue if noted is not None and noted.queue else _QUEUES[kind]
        return JobView(
            job_id,
            JobState.QUEUED,
            kind=kind,
            share_id=share_id,
            attempts=0,
            queue=queue,
            jobs_ahead_at_most=self._ahead_at_most(queue),
        )

    def summary(self, share_id: str) -> tuple[JobView, dict[str, Any] | None]:
        """The newest summary job of ``share_id`` (the one its singleton lock holds, queued or
        running, else the one its ``ml_results`` row is of) and its result once it
        succeeded; ``JobUnknown`` when the share has neither."""
        task = self.producer.app.tasks[SUMMARIZE_TASK]
        lock = task.generate_lock(SUMMARIZE_TASK, None, {"request": {"share_id": share_id}})
        try:
            holder = task.get_existing_task_id(lock)
        except RedisError as error:
            raise Unavailable(f"share {share_id}: Redis did not answer: {error}") from error
        key = job_key(JobKind.SUMMARIZE, "", share_id)
        row = self._stored(lambda: self.producer.results.get_by_key(key))
        if holder is not None and (row is None or row.job_id != holder):
            noted = self._noted(holder) or Noted(JobKind.SUMMARIZE, share_id)
            return self.view(holder, noted), None
        if row is None:
            raise unknown_summary(share_id)
        return _from_row(row), row.result if row.status is JobStatus.SUCCESS else None

    def _noted(self, job_id: str) -> Noted | None:
        try:
            return self.ledger.get(job_id)
        except RedisError as error:
            raise Unavailable(f"job {job_id}: Redis did not answer: {error}") from error

    def _stored(self, read: Callable[[], ResultRow | None]) -> ResultRow | None:
        """A row of ``ml_results``; none before any worker made the table."""
        try:
            row = read()
        except StoreRejected:
            if self.producer.results.schema_version() == 0:
                return None
            raise
        return row

    def _ahead_at_most(self, queue_name: str) -> int | None:
        """The ready messages of the queue other than the job's; None if the broker does not
        answer (the state still does)."""
        queue = job_queue(queue_name, ML_EXCHANGE, self.producer.settings)
        try:
            with self.producer.app.connection_for_write() as connection:
                connection.ensure_connection(
                    max_retries=1, interval_start=0, timeout=self.broker_timeout_s
                )
                _, ready, _ = queue(connection.default_channel).queue_declare(passive=True)
        except Exception as error:  # kombu wraps socket, AMQP and auth errors alike
            logger.warning("depth of %s unknown: %s", queue_name, error)
            return None
        return max(int(ready) - 1, 0)
