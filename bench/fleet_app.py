"""The fleet's own worker app with one applied fix undone, or one candidate change made.

``celery -A bench.fleet_app worker`` with ``BENCH_VARIANT=events,sqlite,...`` runs the real
``ollama_worker`` app and tasks, changed only as listed, so that the harness can measure, in
one run, what each fix already in the package saves and what each candidate would. Some
changes are settings read when the app is imported: ``environment`` gives the variables the
worker must start with, and the harness's producer for that variant follows them too. The
harness imports this module for those names; the worker app is made only when Celery asks for
``app``, with the changes of ``BENCH_VARIANT`` made first.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any

__all__ = ["CANDIDATES", "CHANGES", "UNDONE", "apply", "environment"]

# The fixes applied in the package, each undone here; "the fleet before the fixes" is all four.
UNDONE = {
    "events": "task events on in the worker and the producer (AVOCADO_TASK_EVENTS=true)",
    "tracking": "task_track_started on: a STARTED state in Redis",
    "extended": "result_extended on: args, kwargs, name and worker in the Redis result",
    "sqlite": "ml_results SQLite with synchronous=FULL: an fsync at each commit",
}
# Changes not made in the package, measured the same way.
CANDIDATES = {
    "startrow": "no STARTED row in ml_results on a first attempt (only on a redelivery or retry)",
    "metrics": "no Prometheus metrics (AVOCADO_METRICS_PORT=0)",
    "httpxlog": "httpx's per-request INFO log line off",
}
CHANGES = {**UNDONE, **CANDIDATES}

# Changes made through the worker's settings, read when ``ollama_worker`` is imported.
_ENVIRONMENT = {
    "events": {"AVOCADO_TASK_EVENTS": "true"},
    "metrics": {"AVOCADO_METRICS_PORT": "0"},
}


def environment(names: list[str]) -> dict[str, str]:
    """What a worker running the variant ``names`` needs in its environment."""
    found = {"BENCH_VARIANT": ",".join(names)}
    for name in names:
        found.update(_ENVIRONMENT.get(name, {}))
    return found


def _started_row_on_retry_only() -> None:
    from avocado_shared.locks import SingletonJob
    from avocado_shared.store import JobStatus
    from ollama_worker import tasks
    from ollama_worker.results import record_quietly

    def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> None:
        SingletonJob.before_start(self, task_id, args, kwargs)
        redelivered = (self.request.delivery_info or {}).get("redelivered")
        if redelivered or self.request.retries:
            record_quietly(self, task_id, JobStatus.STARTED, kwargs)

    tasks.JobTask.before_start = before_start  # type: ignore[method-assign]


def _sqlite_full() -> None:
    from avocado_shared.store import ResultStore

    connect = ResultStore._connect_sqlite

    def connect_full(self: ResultStore, path: str) -> sqlite3.Connection:
        conn = connect(self, path)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    ResultStore._connect_sqlite = connect_full  # type: ignore[method-assign]


def apply(names: list[str]) -> None:
    """Make the named changes to the worker app (before the worker starts)."""
    from ollama_worker.celery_app import app, settings

    unknown = set(names) - set(CHANGES)
    if unknown:
        raise ValueError(f"unknown changes {sorted(unknown)}; known: {sorted(CHANGES)}")
    if "events" in names and not settings.task_events:
        raise RuntimeError("the events variant needs AVOCADO_TASK_EVENTS=true (environment())")
    if "tracking" in names:
        app.conf.task_track_started = True
    if "extended" in names:
        app.conf.result_extended = True
    if "sqlite" in names:
        _sqlite_full()
    if "startrow" in names:
        _started_row_on_retry_only()
    if "httpxlog" in names:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def __getattr__(name: str) -> Any:
    """``celery -A bench.fleet_app`` asks for ``app``: the fleet's, changed as the variant says."""
    if name in ("app", "celery"):
        from ollama_worker.celery_app import app

        apply([n for n in os.environ.get("BENCH_VARIANT", "").split(",") if n])
        globals()["app"] = globals()["celery"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
