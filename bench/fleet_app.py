"""The fleet's own worker app with a recommended fix applied from outside, to measure it.

``celery -A bench.fleet_app worker`` with ``BENCH_FIXES=events,started,...`` runs the real
``ollama_worker`` app and tasks, changed only as listed. Nothing here changes the package: a
fix that proves worth it is then made in the code for real.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any

from ollama_worker.celery_app import app

__all__ = ["FIXES", "app", "apply"]

FIXES = {
    "events": "no task events (worker_send_task_events and task_send_sent_event off)",
    "tracking": "no STARTED state in the result backend (task_track_started off)",
    "startrow": "no STARTED row in ml_results (attempts would be counted another way)",
    "sqlite": "ml_results SQLite with synchronous=NORMAL (WAL: durable across a crash of the "
    "process, not of the machine)",
    "httpxlog": "httpx's per-request INFO log line off",
    "extended": "result_extended off (no args, kwargs, name, worker in the Redis result)",
    "metrics": "no Prometheus metrics: the harness sets AVOCADO_METRICS_PORT=0 (read at import)",
}


def _no_started_row() -> None:
    from avocado_shared.locks import SingletonJob
    from ollama_worker import tasks

    def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> None:
        SingletonJob.before_start(self, task_id, args, kwargs)

    tasks.JobTask.before_start = before_start  # type: ignore[method-assign]


def _sqlite_normal() -> None:
    from avocado_shared.store import ResultStore

    connect = ResultStore._connect_sqlite

    def connect_normal(self: ResultStore, path: str) -> sqlite3.Connection:
        conn = connect(self, path)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    ResultStore._connect_sqlite = connect_normal  # type: ignore[method-assign]


def apply(names: list[str]) -> None:
    """Apply the named fixes to the worker app (before the worker starts)."""
    unknown = set(names) - set(FIXES)
    if unknown:
        raise ValueError(f"unknown fixes {sorted(unknown)}; known: {sorted(FIXES)}")
    if "events" in names:
        app.conf.worker_send_task_events = False
        app.conf.task_send_sent_event = False
    if "tracking" in names:
        app.conf.task_track_started = False
    if "startrow" in names:
        _no_started_row()
    if "sqlite" in names:
        _sqlite_normal()
    if "httpxlog" in names:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if "extended" in names:
        app.conf.result_extended = False


apply([n for n in os.environ.get("BENCH_FIXES", "").split(",") if n])
