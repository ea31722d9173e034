"""A real worker inside the test process: the fleet's app and bootsteps, the threads pool,
the broker, Redis and the database for real, on a thread instead of a subprocess.

Starting one costs a connection, not an interpreter and its imports; the job tests whose
worker need not die use it. Celery keeps some worker state per process
(``celery.worker.state``), so one test process runs one such worker at a time.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from typing import Any

from celery.app import trace
from celery.platforms import EX_OK
from celery.result import _set_task_join_will_block
from celery.worker import state as worker_state

from ollama_worker.celery_app import WorkerApp, create_app
from ollama_worker.settings import WorkerSettings

__all__ = ["InProcessWorker", "given_settings"]

_running: list[InProcessWorker] = []


class _GivenSettings(WorkerSettings):
    """Worker settings from the values given only: no environment, no ``.env``, as a
    subprocess started with the tests' own environment would see."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: Any, init_settings: Any, **_: Any
    ) -> tuple[Any, ...]:
        return (init_settings,)


def given_settings(env: dict[str, str]) -> WorkerSettings:
    """Settings from ``AVOCADO_*`` variables as a worker subprocess would read them."""
    prefix = "AVOCADO_"
    fields = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    return _GivenSettings(**fields)


class InProcessWorker:
    """``celery worker`` on a thread of this process, its log kept in memory."""

    def __init__(self, settings: WorkerSettings, concurrency: int) -> None:
        if _running:
            raise RuntimeError(
                f"{_running[0].name} runs in this process already: start this one as a "
                "subprocess (worker_factory.process)"
            )
        self.name = f"test-{uuid.uuid4().hex[:6]}@localhost"
        self.app: WorkerApp = create_app(settings)
        self._log = io.StringIO()
        self._handler = logging.StreamHandler(self._log)
        self._handler.setFormatter(logging.Formatter("[%(levelname)s/%(name)s] %(message)s"))
        self._ready = threading.Event()
        self._controller = self.app.WorkController(
            hostname=self.name,
            concurrency=concurrency,
            pool="threads",
            loglevel="INFO",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=lambda consumer: self._ready.set(),
        )
        self._thread = threading.Thread(
            target=self._controller.start, name=f"worker {self.name}", daemon=True
        )
        self._level = logging.getLogger().level

    def start(self, timeout: float = 60.0) -> InProcessWorker:
        """Start consuming; return once the consumer is ready."""
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)
        _running.append(self)
        # What `celery worker` does before it starts: its app is the default one (the
        # threads pool runs jobs on it) and jobs know the node's name.
        trace.setup_worker_optimizations(self.app, self.name)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise AssertionError(f"worker {self.name} not ready in {timeout}s:\n{self.log_text()}")
        # The pool told Celery that waiting on a result would block it; in this process the
        # test, not a job, waits on results (as celery.contrib.testing.worker does).
        _set_task_join_will_block(False)
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def log_text(self) -> str:
        return self._log.getvalue()

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown, as SIGTERM: running jobs finish. 0 once the worker ended."""
        if self._thread.is_alive():
            # The flag a SIGTERM sets, read by the worker's own loop: stopping the worker
            # from this thread would read the broker connection from two threads at once.
            worker_state.should_stop = EX_OK
            # A ping wakes the loop from its wait on the broker, so it reads the flag now. On a
            # connection of its own: one the app's pool kept idle may have been closed by the
            # broker since (seen: ConnectionResetError, the worker left running).
            with self.app.connection_for_write() as connection:
                self.app.control.ping([self.name], timeout=0.2, connection=connection)
            self._thread.join(timeout)
            worker_state.should_stop = None
        if self in _running:
            _running.remove(self)
            trace.reset_worker_optimizations(self.app)
            root = logging.getLogger()
            root.removeHandler(self._handler)
            root.setLevel(self._level)
        if self._thread.is_alive():
            raise AssertionError(f"worker {self.name} did not stop in {timeout}s")
        return 0
