"""The worker's spans: a job's run (in the trace its message carries), its model call named
and attributed by OpenTelemetry's GenAI conventions, and its result write. Each records
nothing unless a tracer provider is set (``avocado_shared.tracing.setup_tracing``)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from avocado_shared.contracts import Usage
from avocado_shared.tracing import consumed, tracer
from ollama_worker.inference import ChunkSink

__all__ = ["ModelCall", "job_span", "model_call", "result_write_span"]

# A retry's countdown in binary ahead of its routing key (kombu's native delayed delivery).
_DELAYED = re.compile(r"^(?:[01]\.)+(?=[^01.])")


@contextmanager
def job_span(name: str, request: Any) -> Iterator[trace.Span]:
    """A job's run, the child of the publish span its message's headers carry: a retry and a
    redelivery carry the same headers, so every attempt of a job joins one trace."""
    delivery = getattr(request, "delivery_info", None) or {}
    queue = _DELAYED.sub("", str(delivery.get("routing_key") or name))
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": str(request.id),
        "avocado.task": name,
        "avocado.retries": int(getattr(request, "retries", 0) or 0),
        "avocado.redelivered": bool(delivery.get("redelivered")),
        "avocado.worker": str(getattr(request, "hostname", "") or ""),
    }
    with (
        consumed(getattr(request, "headers", None)),
        tracer().start_as_current_span(
            f"process {queue}", kind=trace.SpanKind.CONSUMER, attributes=attributes
        ) as span,
    ):
        yield span


class ModelCall:
    """One call to the inference server, as its span sees it."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._started = time.monotonic()
        self._first: float | None = None

    def timed(self, sink: ChunkSink) -> ChunkSink:
        """``sink``, noting when the first chunk came (the time to first token)."""

        def first_noted(chunk: str) -> None:
            if self._first is None:
                self._first = time.monotonic() - self._started
                self.span.set_attribute("gen_ai.response.time_to_first_chunk", self._first)
                self.span.add_event("gen_ai.first_chunk")
            sink(chunk)

        return first_noted

    def finished(self, usage: Usage) -> None:
        """What the server said the call cost, by the GenAI conventions' names."""
        self.span.set_attributes(
            {
                "gen_ai.response.model": usage.model,
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            }
        )
        if usage.done_reason:
            self.span.set_attribute("gen_ai.response.finish_reasons", [usage.done_reason])


@contextmanager
def model_call(provider: str, operation: str, model: str) -> Iterator[ModelCall]:
    """The span of a model call: ``{operation} {model}`` (``chat``, ``text_completion``,
    ``embeddings``), a client span of the GenAI conventions."""
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    with tracer().start_as_current_span(
        f"{operation} {model}", kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield ModelCall(span)


def result_write_span(job_id: str) -> AbstractContextManager[trace.Span]:
    """The span of the job's row written to ``ml_results`` (an upsert)."""
    attributes: dict[str, AttributeValue] = {
        "db.operation.name": "upsert",
        "db.collection.name": "ml_results",
        "avocado.job_id": job_id,
    }
    return tracer().start_as_current_span(
        "upsert ml_results", kind=trace.SpanKind.CLIENT, attributes=attributes
    )
