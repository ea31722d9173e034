"""Bare Celery, the dispatch baseline (``celery -A bench.noop_app worker``): a no-op task with
what every job on this stack pays for (confirms, a quorum queue, late acks, the Redis backend)
and nothing the fleet adds (locks, leases, ``ml_results``, the model; no events or STARTED)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from avocado_shared.celery_config import celery_config
from avocado_shared.settings import Settings
from avocado_shared.topology import job_queue

__all__ = ["NOOP_TASK", "make_app", "noop_queue"]

NOOP_TASK = "bench.noop"
BENCH_EXCHANGE = Exchange("bench", type="topic", durable=True)


def noop_queue(settings: Settings) -> Queue:
    """A quorum queue with the job queues' arguments."""
    return job_queue(NOOP_TASK, BENCH_EXCHANGE, settings)


def make_app(settings: Settings) -> Celery:
    """The no-op app: the fleet's broker and backend settings with its own queue and task."""
    config, queue = celery_config(settings), noop_queue(settings)
    config.update(task_queues=(queue,), task_routes={NOOP_TASK: {"queue": queue.name}})
    config.update(task_default_exchange=BENCH_EXCHANGE.name, task_default_queue=queue.name)
    off = (
        "task_track_started",
        "worker_send_task_events",
        "task_send_sent_event",
        "result_extended",
    )
    config.update(task_annotations={}, **dict.fromkeys(off, False))
    app = Celery("bench-noop", set_as_current=False)
    app.config_from_object(config)

    @app.task(name=NOOP_TASK, shared=False, acks_late=True, reject_on_worker_lost=True)
    def noop(index: int = 0) -> dict[str, int]:
        return {"index": index}

    return app


def __getattr__(name: str) -> Any:
    """``celery -A bench.noop_app`` asks for ``app``: made from the environment on demand."""
    if name in ("app", "celery"):
        made = globals()["app"] = globals()["celery"] = make_app(Settings())
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
