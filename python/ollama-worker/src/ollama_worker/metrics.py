"""Prometheus metrics of the worker's LLM jobs, served on ``/metrics`` by its main process.

Under the threads pool (the default) every job runs in the main process: the metrics live
in a registry of the worker and prometheus_client serves it. Under prefork the signals that
see a job end fire in more than one process (the pool child that ran it, and the main
process for a child killed at the hard time limit or a job cancelled when the broker
connection drops), so prometheus_client's documented multiprocess mode is used: each
process writes its samples to files of its own in ``PROMETHEUS_MULTIPROC_DIR``, which the
main process sums when scraped, and a child that exits is marked dead. prometheus_client
reads the variable when it is imported, which ``celery`` does before any worker code runs
(its Flower plugin imports it), so the variable must be set when the worker starts: without
it a prefork worker serves no metrics and says why. The directory's files of an earlier
run are removed at start, as prometheus_client asks.

Queue wait reads the ``x-avocado-sent-at`` header the producer stamps (Celery copies it onto
a retry) and counts from the later of it and the job's ETA, so a retry's countdown is not
waiting. It compares the producer's clock with the worker's: keep hosts on NTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avocado_shared.contracts import JobKind, Usage
from avocado_shared.errors import PermanentError
from avocado_shared.producer import SENT_AT_HEADER
from avocado_shared.topology import EMBED_TASK, GENERATE_TASK, SUMMARIZE_TASK

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

__all__ = [
    "JobMetrics",
    "MetricsExporter",
    "MetricsUnavailable",
    "job_kind",
    "queue_wait",
    "retry_reason",
]

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_KINDS = {
    GENERATE_TASK: JobKind.GENERATE.value,
    SUMMARIZE_TASK: JobKind.SUMMARIZE.value,
    EMBED_TASK: JobKind.EMBED.value,
}
_STATES = ("succeeded", "failed", "retried")
_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class JobMetrics:
    """The job metrics; made once in the main process, before the pool forks.

    ``registry`` None: the samples live in the multiprocess files only. Never the global
    REGISTRY: two workers in one process (tests) keep theirs apart.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Histogram

        self.jobs = Counter(
            "avocado_jobs",
            "Jobs that succeeded or failed for good, and retries scheduled.",
            ["kind", "state"],
            registry=registry,
        )
        self.retries = Counter(
            "avocado_job_retries",
            "Retries scheduled, by the class of the error that caused them.",
            ["kind", "reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "avocado_job_queue_wait_seconds",
            "From publish (or the retry's due time) to the start of each run of a job.",
            ["kind"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.generation = Histogram(
            "avocado_generation_seconds",
            "Ollama's total duration of a successful job (all its calls), by model.",
            ["kind", "model"],
            buckets=_GENERATION_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "avocado_generation_tokens_per_second",
            "Completion tokens over Ollama's eval duration, per successful job, by model.",
            ["kind", "model"],
            buckets=_RATE_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "avocado_prompt_tokens",
            "Prompt tokens Ollama evaluated for successful jobs, by model.",
            ["kind", "model"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "avocado_completion_tokens",
            "Tokens Ollama generated for successful jobs, by model.",
            ["kind", "model"],
            registry=registry,
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

    def succeeded(self, kind: str, usage: Usage | None) -> None:
        """Count the success and what it cost (None: its result said nothing of it)."""
        self.jobs.labels(kind, "succeeded").inc()
        if usage is None:
            return
        model = usage.model or "unknown"
        self.prompt_tokens.labels(kind, model).inc(usage.prompt_tokens)
        self.completion_tokens.labels(kind, model).inc(usage.completion_tokens)
        if usage.total_duration_ms > 0:
            self.generation.labels(kind, model).observe(usage.total_duration_ms / 1000)
        if usage.completion_tokens > 0 and usage.eval_duration_ms > 0:
            self.tokens_per_second.labels(kind, model).observe(usage.tokens_per_s)

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


class MetricsUnavailable(PermanentError):
    """This worker cannot count its jobs as configured; it runs them without metrics."""


def job_kind(task: Any) -> str | None:
    """The metrics label of a fleet job's task; None for any other task."""
    return _KINDS.get(getattr(task, "name", ""))


class MetricsExporter:
    """The worker's metrics and their HTTP server: made before the pool forks, served once
    it runs, closed at shutdown."""

    def __init__(self, host: str, port: int, *, multiprocess: bool) -> None:
        """``multiprocess``: the samples of every process of the pool, from the files in
        ``PROMETHEUS_MULTIPROC_DIR``; ``MetricsUnavailable`` when it is not set."""
        self.host, self.port = host, port
        self.directory = os.environ.get(MULTIPROC_ENV) if multiprocess else None
        if multiprocess:
            if not self.directory:
                raise MetricsUnavailable(
                    f"the prefork pool needs {MULTIPROC_ENV} set to an empty directory "
                    "when the worker starts (or AVOCADO_WORKER_POOL=threads)"
                )
            for stale in Path(self.directory).glob("*.db"):
                stale.unlink()
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.registry = CollectorRegistry()
        if self.directory is not None:
            MultiProcessCollector(self.registry, path=self.directory)
        self.jobs = JobMetrics(None if multiprocess else self.registry)
        self.server: WSGIServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def serve(self) -> None:
        """Listen; a port another worker holds means a warning, not a crash."""
        from prometheus_client import start_http_server

        try:
            self.server, _ = start_http_server(self.port, self.host, self.registry)
        except OSError as error:
            logger.warning(
                "metrics disabled: cannot listen on %s:%d (%s; another worker on this host?); "
                "give each worker its own AVOCADO_METRICS_PORT, or 0 to turn metrics off",
                self.host,
                self.port,
                error.strerror or error,
            )
            return
        where = f"multiprocess dir {self.directory}" if self.directory else "one process"
        logger.info("metrics on %s (%s)", self.url, where)

    def child_started(self) -> None:
        """A pool child forked after serving began inherits the socket: only the main
        process serves."""
        if self.server is not None:
            self.server.socket.close()

    def child_exited(self, pid: int) -> None:
        """Drop a dead child's live-gauge files, as prometheus_client asks."""
        if self.directory is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
