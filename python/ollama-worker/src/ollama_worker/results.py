"""Each job's row in ``ml_results``, written by the worker that runs it.

The result backend (Redis) expires; this table is the durable record a producer can read
long after, including why a job failed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Task

from avocado_shared.contracts import JobKind, JobResult
from avocado_shared.store import JobStatus, ResultStore, StoreError, job_key
from avocado_shared.topology import EMBED_TASK, SUMMARIZE_TASK
from ollama_worker.resources import resources_of

__all__ = ["node_name", "record", "record_quietly", "started", "stored_success"]

logger = logging.getLogger(__name__)


_KINDS = {SUMMARIZE_TASK: JobKind.SUMMARIZE, EMBED_TASK: JobKind.EMBED}


def node_name(task: Task) -> str:
    """The Celery node running ``task``, for its row and its result."""
    return str(task.request.hostname or resources_of(task.app).settings.worker_id)


def _share_id(kwargs: Mapping[str, Any] | None) -> str | None:
    request = (kwargs or {}).get("request")
    share_id = request.get("share_id") if isinstance(request, dict) else None
    return share_id if isinstance(share_id, str) and share_id else None


def _identity(task: Task, job_id: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The columns that say which job a row is and who ran it."""
    kind = _KINDS.get(task.name, JobKind.GENERATE)
    share_id = _share_id(kwargs) if kind is not JobKind.GENERATE else None
    return {
        "job_key": job_key(kind, job_id, share_id),
        "job_id": job_id,
        "task_type": kind,
        "share_id": share_id,
        "worker": node_name(task),
    }


def record(
    task: Task,
    job_id: str,
    status: JobStatus,
    kwargs: Mapping[str, Any] | None,
    *,
    result: JobResult | None = None,
    error: str | None = None,
) -> None:
    """Upsert the job's row, with its result and what that cost.

    ``job_id`` is explicit: Celery calls ``on_retry`` for a job it cancels from the main
    process, where ``task.request`` is not that job's.
    """
    resources = resources_of(task.app)
    resources.ensure_schema()
    resources.store.record(
        **_identity(task, job_id, kwargs),
        status=status,
        result=None if result is None else result.model_dump(mode="json"),
        error=error,
        usage=None if result is None else result.usage(),
    )


def started(task: Task, job_id: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Record the attempt's start (``STARTED``), in the statement that finds a copy of a job
    that succeeded already: then its stored result. None when the database cannot say (the
    job then runs: at least once beats never)."""
    resources = resources_of(task.app)
    try:
        resources.ensure_schema()
        return resources.store.start(**_identity(task, job_id, kwargs))
    except StoreError as error:
        logger.warning("%s[%s]: STARTED not stored, nor checked: %s", task.name, job_id, error)
        return None


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


def stored_success(store: ResultStore, job_id: str) -> dict[str, Any] | None:
    """The stored result of ``job_id`` if it already succeeded; None otherwise, or when the
    database cannot say (the job then runs: at least once beats never)."""
    try:
        return store.succeeded(job_id)
    except StoreError as error:
        logger.warning(
            "job %s: ml_results not readable, not checked for a result: %s", job_id, error
        )
        return None
