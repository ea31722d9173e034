"""The gateway's Prometheus metrics on ``/metrics``, in a registry of its app's own, so two
apps in one process (tests) keep theirs apart.

Each is measured in one place: an ASGI middleware around every request (requests by route
and status, time to first token, active streams), the reader of a job's token stream,
which every answer, streamed or not, is read through (queue wait, tokens per second), and the
fleet's models, read at each scrape (backlog per model and lane, nodes, slots).
prometheus_client's single-process mode: ``avocado-infer`` runs one uvicorn worker. Run
more gateways as more processes (or containers), each scraped on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import redis.asyncio
from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avocado_shared.contracts import Usage
from avocado_shared.streams import AsyncJobStream, StreamEntry

if TYPE_CHECKING:
    from avocado_infer.gateway import ServedModel

__all__ = ["GatewayMetrics", "MeteredStream", "instrument"]

logger = logging.getLogger(__name__)

_STREAM_TYPES = (b"application/x-ndjson", b"text/event-stream")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_RATES = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class GatewayMetrics:
    """The metrics of one app, in ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "avocado_infer_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "avocado_infer_time_to_first_token_seconds",
            "From a streamed request's arrival to the first piece of its answer sent.",
            ["route"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "avocado_infer_active_streams",
            "Streamed answers being sent now.",
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "avocado_infer_queue_wait_seconds",
            "From the job's publish to the first entry of its token stream: its time in the "
            "queue, then its worker's until its server's first chunk.",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            "avocado_infer_tokens_per_second",
            "Completion tokens over the server's eval duration, per finished answer, by model.",
            ["model"],
            buckets=_RATES,
            registry=self.registry,
        )

    def watch(self, models: Callable[[], Sequence[ServedModel]]) -> None:
        """Report the fleet's backlog per model and lane, and its nodes and slots per model,
        read from ``models`` at each scrape: the scaling signal."""
        self.registry.register(_Fleet(models))

    def finished(self, usage: Usage) -> None:
        """An answer ended, having cost ``usage``."""
        if usage.eval_duration_ms > 0:
            self.tokens_per_second.labels(usage.model or "unknown").observe(usage.tokens_per_s)

    def exposition(self) -> Response:
        """The registry in Prometheus' text format."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Fleet(Collector):
    """The fleet's models as gauges, read when scraped."""

    def __init__(self, models: Callable[[], Sequence[ServedModel]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        try:
            models = self._models()
        except Exception as error:  # a scrape reports what it can; the logs say why not
            logger.warning("the fleet's backlog is not readable: %s", error)
            return
        backlog = GaugeMetricFamily(
            "avocado_backlog_jobs",
            "Jobs waiting in a model's lane queue (not yet delivered to a node), as this "
            "gateway last read the broker (at most a second ago).",
            labels=["model", "lane"],
        )
        nodes = GaugeMetricFamily(
            "avocado_model_nodes",
            "Live nodes that serve a model and take its jobs (draining ones not counted).",
            labels=["model"],
        )
        slots = GaugeMetricFamily(
            "avocado_model_slots", "Jobs those nodes run at once, in all.", labels=["model"]
        )
        for model in models:
            for lane, depth in model.backlog.items():
                if depth is not None:
                    backlog.add_metric([model.name, lane], depth)
            taking = [node for node in model.nodes if not node.draining]
            nodes.add_metric([model.name], len(taking))
            slots.add_metric([model.name], sum(node.slots for node in taking))
        yield from (backlog, nodes, slots)


class MeteredStream(AsyncJobStream):
    """A job's token stream that reports, read from its start, how long its first entry took
    to come and, from its final entry, how fast the answer was generated."""

    def __init__(
        self, client: redis.asyncio.Redis, key_prefix: str, job_id: str, metrics: GatewayMetrics
    ) -> None:
        super().__init__(client, key_prefix, job_id)
        self.metrics = metrics

    async def entries(
        self, after: str = "0-0", timeout_s: float = 60.0
    ) -> AsyncIterator[StreamEntry]:
        """``AsyncJobStream.entries``; the gateway reads from the start right after publishing,
        so the wait for the first entry is the job's wait for a worker and its first chunk."""
        began = time.perf_counter() if after == "0-0" else None
        async for entry in super().entries(after, timeout_s):
            if began is not None:
                self.metrics.queue_wait.observe(time.perf_counter() - began)
                began = None
            if entry.usage is not None:
                self.metrics.finished(entry.usage)
            yield entry


def _route(scope: Scope) -> str:
    """The matched route's template (``/jobs/{job_id}``), never the raw path: few labels."""
    return str(getattr(scope.get("route"), "path", "unmatched"))


class _Instrumented:
    """Counts each request once it ended, and times and counts streamed answers."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # unless a response starts: the app raised
        streaming = waiting = False

        async def sending(message: Message) -> None:
            nonlocal status, streaming, waiting
            if message["type"] == "http.response.start":
                status = message["status"]
                kind = dict(message.get("headers") or []).get(b"content-type", b"")
                streaming = waiting = kind.startswith(_STREAM_TYPES)
                if streaming:
                    self.metrics.active_streams.inc()
            elif message["type"] == "http.response.body" and streaming:
                if waiting and message.get("body"):
                    waiting = False
                    elapsed = time.perf_counter() - began
                    self.metrics.first_token.labels(_route(scope)).observe(elapsed)
                if not message.get("more_body", False):
                    streaming = False
                    self.metrics.active_streams.dec()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if streaming:  # the client left, or the body raised, before its end
                self.metrics.active_streams.dec()
            self.metrics.requests.labels(_route(scope), scope["method"], str(status)).inc()


def instrument(app: FastAPI) -> GatewayMetrics:
    """Measure ``app``'s requests and serve its metrics on ``GET /metrics``."""
    metrics = GatewayMetrics()
    app.add_middleware(_Instrumented, metrics=metrics)
    app.add_api_route("/metrics", metrics.exposition, methods=["GET"], include_in_schema=False)
    return metrics
