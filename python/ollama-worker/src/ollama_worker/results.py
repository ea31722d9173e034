"""Each job's row in ``ml_results``, written by the worker that runs it.

The result backend (Redis) expires; this table is the durable record a producer can read
long after, including why a job failed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.signals import worker_init

from avocado_shared.contracts import JobKind
from avocado_shared.store import JobStatus, ResultStore, StoreError, job_key
from avocado_shared.topology import SUMMARIZE_TASK
from ollama_worker.celery_app import settings

__all__ = ["record", "record_quietly", "store"]

logger = logging.getLogger(__name__)

# One per process; it connects lazily and again after the pool forks.
store = ResultStore.from_settings(settings)

_USAGE = ("model", "prompt_tokens", "completion_tokens", "total_duration_ms", "eval_duration_ms")


_schema_ready = False


def _ensure_schema() -> None:
    """Create or upgrade the schema once per process (forked children inherit the flag)."""
    global _schema_ready
    if not _schema_ready:
        store.migrate()
        _schema_ready = True


@worker_init.connect
def _migrate(**_: Any) -> None:
    """Migrate at start; when the database is down, the first job to store a row does it."""
    try:
        _ensure_schema()
        logger.info("results in %r", store)
    except StoreError as error:
        logger.error("results database not ready, will retry on the first job: %s", error)


def _share_id(kwargs: Mapping[str, Any] | None) -> str | None:
    request = (kwargs or {}).get("request")
    share_id = request.get("share_id") if isinstance(request, dict) else None
    return share_id if isinstance(share_id, str) and share_id else None


def record(
    task: Task,
    job_id: str,
    status: JobStatus,
    kwargs: Mapping[str, Any] | None,
    *,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Upsert the job's row; the usage columns come from its result.

    ``job_id`` is explicit: Celery calls ``on_retry`` for a job it cancels from the main
    process, where ``task.request`` is not that job's.
    """
    kind = JobKind.SUMMARIZE if task.name == SUMMARIZE_TASK else JobKind.GENERATE
    share_id = _share_id(kwargs) if kind is JobKind.SUMMARIZE else None
    usage = {name: (result or {}).get(name) for name in _USAGE}
    _ensure_schema()
    store.record(
        job_key=job_key(kind, job_id, share_id),
        job_id=job_id,
        task_type=kind,
        share_id=share_id,
        status=status,
        result=result,
        error=error,
        worker=str(task.request.hostname or settings.worker_id),
        **usage,
    )


def record_quietly(
    task: Task,
    job_id: str,
    status: JobStatus,
    kwargs: Mapping[str, Any] | None,
    error: str | None = None,
) -> None:
    """``record`` for a state change the job must not fail over: a warning when it cannot."""
    try:
        record(task, job_id, status, kwargs, error=error)
    except StoreError as failure:
        logger.warning("%s[%s]: %s not stored: %s", task.name, job_id, status.value, failure)
