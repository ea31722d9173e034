"""Prometheus metrics of the worker's LLM jobs, served on ``/metrics`` by its main process.

Why prometheus_client's multiprocess mode: the signals that see a job end fire in more than
one process. Under prefork ``task_prerun``, ``task_success``, ``task_retry`` and most
``task_failure`` fire in the pool child that ran the job, but the main process fires
``task_failure`` itself for a child killed at the hard time limit or lost for good, and
``task_retry`` for a job it cancels when the broker connection drops. So each process
writes its samples to an mmap file of its own (by pid) in a directory private to this
worker, and the main process sums the files when scraped; a replaced child's file stays, so
counters never go back. Counting in the main process only would need the tokens and
durations that only the child sees shipped back to it.

At ``worker_init``, before the pool forks, the port is bound (a port another worker holds
means a warning and a worker without metrics, not a crash), the directory made and
prometheus_client pointed at it, so the children inherit both; serving starts at
``worker_ready``; the directory is removed at ``worker_shutdown`` (a SIGKILLed worker leaves
it in the temp dir). With metrics off prometheus_client is never imported.

Queue wait reads the ``x-avocado-sent-at`` header the producer stamps (Celery copies it onto
a retry) and counts from the later of it and the job's ETA, so a retry's countdown is not
waiting. It compares the producer's clock with the worker's: keep hosts on NTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from celery.signals import (
    task_failure,
    task_prerun,
    task_retry,
    task_success,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from avocado_shared.contracts import JobKind
from avocado_shared.producer import SENT_AT_HEADER
from avocado_shared.topology import GENERATE_TASK, SUMMARIZE_TASK
from ollama_worker.celery_app import settings

__all__ = ["JobMetrics", "queue_wait", "retry_reason"]

logger = logging.getLogger(__name__)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_KINDS = {GENERATE_TASK: JobKind.GENERATE.value, SUMMARIZE_TASK: JobKind.SUMMARIZE.value}
_STATES = ("succeeded", "failed", "retried")
_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class JobMetrics:
    """The job metrics; made once in the main process, before the pool forks."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        # registry=None: the samples live in the multiprocess files, which the main process
        # collects into a registry of its own; nothing goes into the global REGISTRY.
        self.jobs = Counter(
            "avocado_jobs",
            "Jobs that succeeded or failed for good, and retries scheduled.",
            ["kind", "state"],
            registry=None,
        )
        self.retries = Counter(
            "avocado_job_retries",
            "Retries scheduled, by the class of the error that caused them.",
            ["kind", "reason"],
            registry=None,
        )
        self.queue_wait = Histogram(
            "avocado_job_queue_wait_seconds",
            "From publish (or the retry's due time) to the start of each run of a job.",
            ["kind"],
            buckets=_WAIT_BUCKETS,
            registry=None,
        )
        self.generation = Histogram(
            "avocado_generation_seconds",
            "Ollama's total duration of a successful job (all its calls), by model.",
            ["kind", "model"],
            buckets=_GENERATION_BUCKETS,
            registry=None,
        )
        self.tokens_per_second = Histogram(
            "avocado_generation_tokens_per_second",
            "Completion tokens over Ollama's eval duration, per successful job, by model.",
            ["kind", "model"],
            buckets=_RATE_BUCKETS,
            registry=None,
        )
        self.prompt_tokens = Counter(
            "avocado_prompt_tokens",
            "Prompt tokens Ollama evaluated for successful jobs, by model.",
            ["kind", "model"],
            registry=None,
        )
        self.completion_tokens = Counter(
            "avocado_completion_tokens",
            "Tokens Ollama generated for successful jobs, by model.",
            ["kind", "model"],
            registry=None,
        )
        for kind in _KINDS.values():  # every series exists from the start, so rate() works
            self.queue_wait.labels(kind)
            for state in _STATES:
                self.jobs.labels(kind, state)

    def started(self, kind: str, request: Any) -> None:
        """One run of a job began: how long it waited in the queue, when the producer said."""
        waited = queue_wait(request)
        if waited is not None:
            self.queue_wait.labels(kind).observe(waited)

    def succeeded(self, kind: str, result: Any) -> None:
        """Count the success and what the result says Ollama did."""
        self.jobs.labels(kind, "succeeded").inc()
        if not isinstance(result, dict):
            return
        model = str(result.get("model") or "unknown")
        prompt, completion = _number(result, "prompt_tokens"), _number(result, "completion_tokens")
        total_ms, eval_ms = (
            _number(result, "total_duration_ms"),
            _number(result, "eval_duration_ms"),
        )
        self.prompt_tokens.labels(kind, model).inc(prompt)
        self.completion_tokens.labels(kind, model).inc(completion)
        if total_ms > 0:
            self.generation.labels(kind, model).observe(total_ms / 1000)
        if completion > 0 and eval_ms > 0:
            self.tokens_per_second.labels(kind, model).observe(completion / (eval_ms / 1000))

    def failed(self, kind: str) -> None:
        self.jobs.labels(kind, "failed").inc()

    def retried(self, kind: str, reason: str) -> None:
        self.jobs.labels(kind, "retried").inc()
        self.retries.labels(kind, reason).inc()


def retry_reason(reason: Any) -> str:
    """A retry's reason as a label of few values: the class of the error behind it."""
    error = getattr(reason, "exc", None) or reason  # celery's Retry carries the error
    if error is None:
        return "BrokerConnectionLost"  # Celery cancels running jobs when the broker goes
    return type(error).__name__ if isinstance(error, BaseException) else "unknown"


def _number(result: dict[str, Any], key: str) -> float:
    value = result.get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


def queue_wait(request: Any) -> float | None:
    """Seconds since the job became due: sent (producer's header) or its ETA, the later."""
    headers = getattr(request, "headers", None) or {}
    try:
        sent = float(headers[SENT_AT_HEADER])
    except (KeyError, TypeError, ValueError):
        return None  # published by something other than our producer
    due = sent
    eta = getattr(request, "eta", None)
    if eta:
        with contextlib.suppress(TypeError, ValueError):
            due = max(due, datetime.fromisoformat(str(eta)).timestamp())
    return max(0.0, time.time() - due)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds would drown the worker's log."""


class _Exporter:
    """The private multiprocess directory and the HTTP server of the main process."""

    def __init__(self, server: _Server, directory: str) -> None:
        self.server = server
        self.directory = directory
        self.serving = False

    @property
    def url(self) -> str:
        host, port = self.server.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def serve(self) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        self.server.set_app(make_wsgi_app(registry))
        thread = threading.Thread(
            target=self.server.serve_forever, name="avocado-metrics", daemon=True
        )
        thread.start()
        self.serving = True

    def close(self) -> None:
        if self.serving:
            self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


_metrics: JobMetrics | None = None
_exporter: _Exporter | None = None
_bind_error: str | None = None
_saved_env: str | None = None


def _use_multiprocess(directory: str | None) -> None:
    """Point prometheus_client at ``directory`` (None: back to one process).

    It reads the variable (children inherit it) and picks its value class on import,
    which may have happened before: so the class is picked again.
    """
    global _saved_env
    if directory is not None:
        _saved_env = os.environ.get(_MULTIPROC_ENV)
        os.environ[_MULTIPROC_ENV] = directory
    elif _saved_env is None:
        os.environ.pop(_MULTIPROC_ENV, None)
    else:
        os.environ[_MULTIPROC_ENV] = _saved_env
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def _bind(host: str, port: int) -> _Server:
    server_class = _Server6 if ":" in host else _Server
    return server_class((host, port), _QuietHandler)


@worker_init.connect
def _prepare(**_: Any) -> None:
    """Bind the port and make the directory before the pool forks (logged when ready)."""
    global _metrics, _exporter, _bind_error
    port = settings.metrics_port
    if not port:
        return
    try:
        server = _bind(settings.metrics_host, port)
    except OSError as error:
        _bind_error = f"{settings.metrics_host}:{port}: {error.strerror or error}"
        return
    directory = tempfile.mkdtemp(prefix="avocado-metrics-")
    _use_multiprocess(directory)
    _metrics = JobMetrics()
    _exporter = _Exporter(server, directory)


@worker_ready.connect
def _serve(**_: Any) -> None:
    if _bind_error is not None:
        logger.warning(
            "metrics disabled: cannot listen on %s (another worker on this host?); "
            "give each worker its own AVOCADO_METRICS_PORT, or 0 to turn metrics off",
            _bind_error,
        )
    if _exporter is None:
        return
    _exporter.serve()
    logger.info("metrics on %s (multiprocess dir %s)", _exporter.url, _exporter.directory)


@worker_process_init.connect
def _drop_listener(**_: Any) -> None:
    """A pool child inherits the listening socket; only the main process serves."""
    if _exporter is not None:
        _exporter.server.socket.close()


@worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: Any) -> None:
    """Drop the child's live-gauge files, as prometheus_client asks of a dead process."""
    if _exporter is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), _exporter.directory)


@worker_shutdown.connect
def _close(**_: Any) -> None:
    global _exporter, _metrics
    exporter, _exporter = _exporter, None
    if exporter is not None:
        exporter.close()
        _metrics = None
        _use_multiprocess(None)


def _kind(task: Any) -> str | None:
    return _KINDS.get(getattr(task, "name", ""))


@task_prerun.connect
def _on_start(task: Any = None, **_: Any) -> None:
    if _metrics is not None and (kind := _kind(task)) is not None:
        _metrics.started(kind, task.request)


@task_success.connect
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if _metrics is not None and (kind := _kind(sender)) is not None:
        _metrics.succeeded(kind, result)


@task_failure.connect
def _on_failure(sender: Any = None, **_: Any) -> None:
    if _metrics is not None and (kind := _kind(sender)) is not None:
        _metrics.failed(kind)


@task_retry.connect
def _on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    if _metrics is not None and (kind := _kind(sender)) is not None:
        _metrics.retried(kind, retry_reason(reason))
