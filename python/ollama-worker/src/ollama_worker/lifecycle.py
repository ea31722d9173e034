"""The worker's life in one place: a bootstep that opens, starts and stops its resources,
and the few signals that reach what a bootstep cannot (pool children, job outcomes).

Every receiver acts only for a worker app that holds ``Resources``, so a producer's app,
or a second worker in the same process (the tests), is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps, current_app
from celery.signals import (
    celeryd_init,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_success,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from avocado_shared.contracts import Usage
from avocado_shared.tracing import flush_tracing, setup_tracing
from ollama_worker.metrics import JobMetrics, job_kind, retry_reason
from ollama_worker.resources import Resources, held_by
from ollama_worker.serving import server_slots
from ollama_worker.settings import WorkerSettings

__all__ = ["Lifecycle"]

logger = logging.getLogger(__name__)


class Lifecycle(bootsteps.StartStopStep):  # type: ignore[misc]
    """Resources opened when the worker is made (before the pool forks), started after the
    pool (so no child inherits the metrics socket), stopped at shutdown."""

    requires = ("celery.worker.components:Pool",)

    def create(self, parent: Any) -> Resources:
        setup_tracing("avocado-worker")  # before the pool forks: its children inherit it
        resources = Resources(parent.app, parent.app.settings)
        resources.open(parent.hostname, parent.concurrency)
        parent.app.resources = resources
        return resources


def _metrics(task: Any) -> tuple[JobMetrics, str] | None:
    """The job metrics of the worker running ``task`` and its label, for a fleet job."""
    resources = held_by(getattr(task, "app", None))
    kind = job_kind(task)
    if resources is None or resources.metrics is None or kind is None:
        return None
    return resources.metrics.jobs, kind


@celeryd_init.connect
def _learn_slots(instance: Any = None, conf: Any = None, options: Any = None, **_: Any) -> None:
    """A worker told no ``--concurrency`` runs as many jobs at once as its server can."""
    settings = getattr(getattr(instance, "app", None), "settings", None)
    if isinstance(settings, WorkerSettings) and not (options or {}).get("concurrency"):
        conf.worker_concurrency = server_slots(settings)
        logger.info("%d jobs at once, as %s can run", conf.worker_concurrency, settings.server_url)


@worker_shutdown.connect
def _worker_stopped(sender: Any = None, **_: Any) -> None:
    """Close the resources once the pool has stopped: the bootstep's own stop comes before
    the pool's, while a warm shutdown's last jobs still use the store and the clients."""
    resources = held_by(getattr(sender, "app", None))
    if resources is not None:
        resources.close()


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    resources = held_by(current_app)
    if resources is not None and resources.metrics is not None:
        resources.metrics.child_started()


@worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    flush_tracing()  # a pool child leaves by os._exit: no exit handler exports its last spans
    resources = held_by(current_app)
    if resources is not None:
        resources.close_clients()
        if resources.metrics is not None:
            resources.metrics.child_exited(pid or os.getpid())


@task_prerun.connect
def _job_started(task: Any = None, task_id: str | None = None, **_: Any) -> None:
    resources = held_by(getattr(task, "app", None))
    if resources is not None and resources.serving.cutoff is not None and task_id:
        resources.serving.cutoff.job_started(task_id)
    if (found := _metrics(task)) is not None:
        jobs, kind = found
        jobs.started(kind, task.request)


@task_postrun.connect
def _job_ended(task: Any = None, task_id: str | None = None, **_: Any) -> None:
    """How long the job took, for a node that drains before its cutoff."""
    resources = held_by(getattr(task, "app", None))
    if resources is not None and resources.serving.cutoff is not None and task_id:
        resources.serving.cutoff.job_ended(task_id)


@task_success.connect
def _job_succeeded(sender: Any = None, result: Any = None, **_: Any) -> None:
    if (found := _metrics(sender)) is not None:
        jobs, kind = found
        # Every job returns its result's JSON: a Usage and more.
        jobs.succeeded(kind, Usage.model_validate(result) if isinstance(result, dict) else None)


@task_failure.connect
def _job_failed(sender: Any = None, **_: Any) -> None:
    if (found := _metrics(sender)) is not None:
        jobs, kind = found
        jobs.failed(kind)


@task_retry.connect
def _job_retried(sender: Any = None, reason: Any = None, **_: Any) -> None:
    if (found := _metrics(sender)) is not None:
        jobs, kind = found
        jobs.retried(kind, retry_reason(reason))
