"""OpenTelemetry traces, off unless the standard ``OTEL_*`` variables ask for them.

One trace per job: the producer's publish span carries its context to the worker in the
message's headers (W3C ``traceparent``), so the worker's run, its model call and its result
write, and every later attempt (a retry, a redelivery: the same headers), join the trace.
Only the API is imported here (cheap, and a no-op until a provider is set); the SDK and the
OTLP exporter are imported by ``setup_tracing`` when the environment turns traces on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.util.types import AttributeValue

__all__ = [
    "TRACER_NAME",
    "consumed",
    "flush_tracing",
    "inject_headers",
    "publish_span",
    "setup_tracing",
    "tracer",
    "tracing_active",
    "tracing_requested",
]

logger = logging.getLogger(__name__)

TRACER_NAME = "avocado"

_TRUE = ("true", "1", "yes", "on")
_setup_lock = threading.Lock()


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an exporter named in ``OTEL_TRACES_EXPORTER``
    (not ``none``) or an OTLP endpoint set, and the SDK not disabled (``OTEL_SDK_DISABLED``).

    These are the SDK's own variables: it reads them again for everything else (endpoint,
    headers, sampler, service name). Unlike the SDK's default, nothing set means no traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def tracing_active() -> bool:
    """Whether a tracer provider is set in this process (by ``setup_tracing`` or by the
    application around us): the gateway instruments its app only then."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def setup_tracing(service_name: str) -> bool:
    """Set this process's tracer provider from the environment, once; whether traces are on.

    A provider already set (by the application, or an earlier call) is left as it is."""
    if not tracing_requested():
        return False
    with _setup_lock:
        if tracing_active():
            return True
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the program's own name.
        named = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(named))
        for exporter in _exporters():
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        logger.info("OpenTelemetry traces on for %s", service_name)
        return True


def _exporters() -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (``otlp`` when only an endpoint is
    set): ``otlp`` (over HTTP, configured by ``OTEL_EXPORTER_OTLP_*``) and ``console``."""
    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp") or "otlp"
    exporters: list[Any] = []
    for name in (part.strip().lower() for part in names.split(",")):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name and name != "none":
            logger.warning("OTEL_TRACES_EXPORTER names %r, which is not otlp or console", name)
    return exporters


def flush_tracing(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered: a process that ends by re-raising its signal (uvicorn
    on SIGTERM) runs no exit handler, so the provider's own flush at exit never comes."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if flush is not None:
        flush(int(timeout_s * 1000))


def tracer() -> trace.Tracer:
    """The fleet's tracer, from whichever provider is set now (none: spans record nothing)."""
    return trace.get_tracer(TRACER_NAME)


def publish_span(task: str, job_id: str, queue: str) -> AbstractContextManager[trace.Span]:
    """The span of a job's publish (the trace's root when no request is around it), by the
    messaging conventions: the queue's routing key, the job's id as the message's."""
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": queue,
        "messaging.rabbitmq.destination.routing_key": queue,
        "messaging.message.id": job_id,
        "avocado.task": task,
    }
    return tracer().start_as_current_span(
        f"publish {queue}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    )


def inject_headers(headers: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the current span's context to a message's ``headers`` (``traceparent``)."""
    propagate.inject(headers)
    return headers


@contextmanager
def consumed(headers: Mapping[str, Any] | None) -> Iterator[None]:
    """Run the block in the context a message's ``headers`` carry (its publish span's)."""
    carried = {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
    token = context.attach(propagate.extract(carried))
    try:
        yield
    finally:
        context.detach(token)
