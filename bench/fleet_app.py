"""``celery -A bench.fleet_app worker`` with ``BENCH_VARIANT=events,sqlite,...``: the fleet's own
worker app with the listed fixes undone or candidate changes made, and nothing else changed."""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable
from typing import Any

__all__ = ["CANDIDATES", "CHANGES", "UNDONE", "apply", "environment", "sqlite_full"]

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
}
CHANGES = {**UNDONE, **CANDIDATES}
_ENV = {"events": [("AVOCADO_TASK_EVENTS", "true")], "metrics": [("AVOCADO_METRICS_PORT", "0")]}


def environment(names: list[str]) -> dict[str, str]:
    """What a worker running the variant ``names`` needs in its environment."""
    return {"BENCH_VARIANT": ",".join(names)} | {k: v for n in names for k, v in _ENV.get(n, [])}


def _started_row_on_retry_only() -> None:
    from ollama_worker import results, tasks

    start = results.started

    def started(task: Any, job_id: str, kwargs: Any) -> dict[str, Any] | None:
        again = (task.request.delivery_info or {}).get("redelivered") or task.request.retries
        return start(task, job_id, kwargs) if again else None

    tasks.started = started  # type: ignore[attr-defined]


def sqlite_full() -> Callable[[], None]:
    """Every SQLite connection from now on commits with ``synchronous=FULL``; returns the undo."""

    class Full(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            sql = "PRAGMA synchronous=FULL" if "synchronous" in sql else sql
            return super().execute(sql, *args)

    connect = sqlite3.dbapi2.connect
    full = functools.partial(connect, factory=Full)
    sqlite3.connect = sqlite3.dbapi2.connect = full  # type: ignore[assignment]

    def undo() -> None:
        sqlite3.connect = sqlite3.dbapi2.connect = connect

    return undo


def apply(app: Any, names: list[str]) -> None:
    """Make the named changes to the worker app (before the worker starts)."""
    if unknown := set(names) - set(CHANGES):
        raise ValueError(f"unknown changes {sorted(unknown)}; known: {sorted(CHANGES)}")
    if "tracking" in names:
        app.conf.task_track_started = True
    if "extended" in names:
        app.conf.result_extended = True
    if "sqlite" in names:
        sqlite_full()
    if "startrow" in names:
        _started_row_on_retry_only()


def __getattr__(name: str) -> Any:
    """``celery -A bench.fleet_app`` asks for ``app``: the fleet's, changed as the variant says."""
    if name in ("app", "celery"):
        import ollama_worker

        apply(ollama_worker.app, [n for n in os.environ.get("BENCH_VARIANT", "").split(",") if n])
        globals()["app"] = globals()["celery"] = ollama_worker.app
        return ollama_worker.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
