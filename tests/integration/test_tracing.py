"""OpenTelemetry traces through the fleet: a gateway and a worker in this process share one
tracer provider whose spans go to the SDK's in-memory exporter. One trace covers the
gateway's request, the publish, the worker's run, the model call and the result write; a job
whose first attempt fails transiently runs again in the same trace."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import httpx
import pytest
import redis
from kombu import Connection
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from avocado_shared.fleet import WorkerRegistry
from avocado_shared.producer import Producer
from avocado_shared.routing import Lane, lane_queue_name
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.processes import wait_for
from tests.services import REDIS_URL

WAIT = 60
MODEL = "llama3.2:1b"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider for one test, its spans kept in memory; unset after,
    as OpenTelemetry's own test utilities do, so no later test of the process traces."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER = None
        trace._TRACER_PROVIDER_SET_ONCE = Once()


def _finished(exporter: InMemorySpanExporter, names: Sequence[str]) -> list[ReadableSpan] | None:
    """Every finished span, once a span whose name starts with each of ``names`` is among
    them (a run's span ends after its children)."""
    done = list(exporter.get_finished_spans())
    return done if all(any(s.name.startswith(n) for s in done) for n in names) else None


def _tree(spans: Sequence[ReadableSpan]) -> str:
    """The spans as an indented tree (parents first, then by start), with their attributes."""
    children: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            kind = span.kind.name.lower()
            status = span.status.status_code.name
            took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
            lines.append(f"{'  ' * depth}{span.name} [{kind}, {status}, {took:.1f} ms]")
            for key, value in sorted((span.attributes or {}).items()):
                lines.append(f"{'  ' * depth}    {key} = {value!r}")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def _one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def test_one_trace_covers_request_publish_run_and_model_call(
    spans: InMemorySpanExporter,
    gateway_factory: Callable[..., InProcessGateway],
    worker_factory: WorkerFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = {"model": MODEL, "prompt": "Say hello.", "stream": False, "options": {"seed": 1}}
    with OllamaSimulator(SimConfig(models=[MODEL])) as sim:
        worker_factory(sim.url)
        gateway = gateway_factory()
        answer = httpx.post(f"{gateway.url}/api/generate", json=body, timeout=WAIT)
        assert answer.status_code == 200, answer.text
        wanted = ("POST /api/generate", "process ", f"text_completion {MODEL}", "upsert ")
        done = wait_for(lambda: _finished(spans, wanted), WAIT, "the job's spans")

    request = _one(done, "POST /api/generate")
    publish = next(s for s in done if s.name.startswith("publish "))
    run = next(s for s in done if s.name.startswith("process "))
    model = _one(done, f"text_completion {MODEL}")
    write = _one(done, "upsert ml_results")
    trace_id = request.context.trace_id
    assert {s.context.trace_id for s in (publish, run, model, write)} == {trace_id}
    assert request.kind is SpanKind.SERVER
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == request.context.span_id
    assert run.kind is SpanKind.CONSUMER
    assert run.parent is not None
    assert run.parent.span_id == publish.context.span_id
    assert model.parent is not None
    assert model.parent.span_id == run.context.span_id
    assert write.parent is not None
    assert write.parent.span_id == run.context.span_id
    job_id = (publish.attributes or {})["messaging.message.id"]
    assert (run.attributes or {})["messaging.message.id"] == job_id
    attributes = dict(model.attributes or {})
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.provider.name"] == "ollama"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.response.model"] == MODEL
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.time_to_first_chunk"] > 0
    with capsys.disabled():
        print(f"\none trace exported by gateway, queue, worker and model ({trace_id:032x}):")
        print(_tree([s for s in done if s.context.trace_id == trace_id]))


def test_a_retried_job_runs_again_in_the_same_trace(
    spans: InMemorySpanExporter,
    gateway_factory: Callable[..., InProcessGateway],
    worker_factory: WorkerFactory,
) -> None:
    body = {"model": MODEL, "prompt": "Say hello.", "stream": False}
    with OllamaSimulator(SimConfig(models=[MODEL], fail_first=1)) as sim:
        worker_factory(sim.url)
        answer = httpx.post(f"{gateway_factory().url}/api/generate", json=body, timeout=WAIT)
        assert answer.status_code == 200, answer.text

        def two_runs() -> list[ReadableSpan] | None:
            done = _finished(spans, ("upsert ml_results",)) or []
            runs = [s for s in done if s.name.startswith("process ")]
            return done if len(runs) == 2 else None

        done = wait_for(two_runs, WAIT, "two runs of the job")

    publish = next(s for s in done if s.name.startswith("publish "))
    runs = sorted((s for s in done if s.name.startswith("process ")), key=lambda s: s.start_time)
    calls = sorted(
        (s for s in done if s.name == f"text_completion {MODEL}"), key=lambda s: s.start_time
    )
    assert {s.context.trace_id for s in (*runs, *calls)} == {publish.context.trace_id}
    assert all(r.parent is not None and r.parent.span_id == publish.context.span_id for r in runs)
    assert [(r.attributes or {})["avocado.retries"] for r in runs] == [0, 1]
    assert [c.status.status_code for c in calls] == [StatusCode.ERROR, StatusCode.UNSET]
    assert [c.parent.span_id for c in calls if c.parent] == [r.context.span_id for r in runs]


def test_a_redelivered_job_runs_in_the_trace_of_its_publish(
    spans: InMemorySpanExporter, producer: Producer, worker_factory: WorkerFactory
) -> None:
    """A job taken and handed back unacknowledged (its worker died) is redelivered by the
    broker with the headers it was published with: its run joins the publish's trace."""
    with OllamaSimulator(SimConfig(models=[MODEL])) as sim:
        handle = producer.generate("Say hello.", model=MODEL, lane=Lane.INTERACTIVE)
        queue = lane_queue_name(MODEL, Lane.INTERACTIVE)
        with Connection(producer.settings.broker_urls[0]) as connection:
            channel = connection.channel()
            taken = wait_for(
                lambda: channel.basic_get(queue, no_ack=False), WAIT, "the job in its queue"
            )
            assert taken.headers["traceparent"]
            channel.close()  # unacknowledged: back to the queue, marked redelivered
        worker_factory(sim.url)
        handle.get(timeout=WAIT)
        done = wait_for(lambda: _finished(spans, ("process ", "upsert ")), WAIT, "the run")

    publish = next(s for s in done if s.name.startswith("publish "))
    run = next(s for s in done if s.name.startswith("process "))
    assert publish.parent is None  # the Python API's publish is the trace's root
    assert run.parent is not None
    assert run.parent.span_id == publish.context.span_id
    assert run.context.trace_id == publish.context.trace_id
    assert (run.attributes or {})["avocado.redelivered"] is True


@pytest.mark.parametrize(
    ("backend", "provider"), [("ollama", "ollama"), ("openai", "openai")], ids=["ollama", "openai"]
)
def test_chat_and_embeddings_spans_name_their_operation_and_count_tokens(
    spans: InMemorySpanExporter,
    producer: Producer,
    worker_factory: WorkerFactory,
    backend: str,
    provider: str,
) -> None:
    """The GenAI span of a chat and of an embedding, on either kind of server."""
    embedding = "all-minilm"
    with OllamaSimulator(SimConfig(models=[MODEL, embedding])) as sim:
        openai = {"AVOCADO_BACKEND": "openai", "AVOCADO_BACKEND_URL": f"{sim.url}/v1"}
        worker_factory(sim.url, **(openai if backend == "openai" else {}))
        messages = [{"role": "user", "content": "Say hello."}]
        producer.generate(messages=messages, model=MODEL).get(timeout=WAIT)
        producer.embed(["one text", "another"], model=embedding).get(timeout=WAIT)
        done = wait_for(lambda: _calls(spans), WAIT, "both model calls")

    chat, embed = done["chat"], done["embeddings"]
    assert chat.name == f"chat {MODEL}"
    assert embed.name.startswith(f"embeddings {embedding}")  # as the server names it
    for operation, span in done.items():
        attributes = dict(span.attributes or {})
        assert attributes["gen_ai.operation.name"] == operation
        assert attributes["gen_ai.provider.name"] == provider
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert span.name.endswith(f" {attributes['gen_ai.request.model']}")
        assert str(attributes["gen_ai.response.model"]).startswith(
            embedding if operation == "embeddings" else MODEL
        )
        assert span.status.status_code is StatusCode.UNSET
        assert span.kind is SpanKind.CLIENT
    attributes = dict(chat.attributes or {})
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.time_to_first_chunk"] > 0


def _calls(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan] | None:
    """The chat and the embeddings span by operation, once both ended under their runs."""
    done = exporter.get_finished_spans()
    runs = {s.context.span_id for s in done if s.name.startswith("process ")}
    calls = {
        s.name.split(" ")[0]: s for s in done if s.parent is not None and s.parent.span_id in runs
    }
    return {op: calls[op] for op in _OPERATIONS} if set(_OPERATIONS) <= set(calls) else None


_OPERATIONS = ("chat", "embeddings")


def test_a_job_whose_worker_is_sigkilled_mid_answer_ends_in_the_trace_it_began(
    spans: InMemorySpanExporter,
    gateway_factory: Callable[..., InProcessGateway],
    worker_factory: WorkerFactory,
    midanswer_sim: OllamaSimulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The worker that began the answer (a subprocess) dies; the broker redelivers the job to
    another (in this process), whose run, continued model call and write join the trace of
    the request that the client is still reading."""
    env = {"AVOCADO_JOB_LEASE_S": "3"}
    doomed = worker_factory.process(midanswer_sim.url, concurrency=1, **env)
    gateway = gateway_factory()
    body = {"model": MODEL, "prompt": "Tell me about avocados.", "stream": True}
    try:
        with httpx.stream("POST", f"{gateway.url}/api/generate", json=body, timeout=WAIT) as answer:
            lines = answer.iter_lines()
            began = [next(lines) for _ in range(5)]
            doomed.kill()
            worker_factory(midanswer_sim.url, concurrency=1, **env)
            rest = list(lines)
    finally:  # the killed node's record, which it never removed, lists its model no more
        registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), worker_factory.key_prefix)
        registry.remove(doomed.name)
        registry.close()
    assert len(began) + len(rest) > 6
    done = wait_for(lambda: _written(spans), WAIT, "the takeover's spans")

    request = _one(done, "POST /api/generate")
    publish = next(s for s in done if s.name.startswith("publish "))
    runs = sorted((s for s in done if s.name.startswith("process ")), key=lambda s: s.start_time)
    call = _one(done, f"text_completion {MODEL}")
    trace_id = request.context.trace_id
    assert {s.context.trace_id for s in (publish, *runs, call)} == {trace_id}
    # The killed worker's run never ended, so it is not exported; the takeover's first run
    # met the dead worker's lease and came back later, its second ran the model.
    assert all(r.parent is not None and r.parent.span_id == publish.context.span_id for r in runs)
    assert (runs[0].attributes or {})["avocado.redelivered"] is True
    assert call.parent is not None
    assert call.parent.span_id == runs[-1].context.span_id
    assert (call.attributes or {})["gen_ai.usage.output_tokens"] > 0
    with capsys.disabled():
        print("\nthe trace of a job whose first worker was SIGKILLed mid-answer:")
        print(_tree([s for s in done if s.context.trace_id == trace_id]))


def _written(exporter: InMemorySpanExporter) -> list[ReadableSpan] | None:
    """Every finished span, once the run that wrote the result has ended too."""
    done = list(exporter.get_finished_spans())
    runs = {s.context.span_id for s in done if s.name.startswith("process ")}
    writes = [s for s in done if s.name.startswith("upsert ")]
    ended = any(w.parent is not None and w.parent.span_id in runs for w in writes)
    return done if ended and _finished(exporter, ("POST /api/generate",)) else None


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_process_traces_when_its_environment_asks(
    spans: InMemorySpanExporter, producer: Producer, worker_factory: WorkerFactory, pool: str
) -> None:
    """``celery worker`` with ``OTEL_TRACES_EXPORTER=console`` sets its tracer provider up
    itself and exports its spans in the trace of the publish, made in this process; flushed
    when it stops, by a prefork pool's child too (it leaves without exit handlers)."""
    with OllamaSimulator(SimConfig(models=[MODEL])) as sim:
        worker = worker_factory.process(
            sim.url, OTEL_TRACES_EXPORTER="console", AVOCADO_WORKER_POOL=pool
        )
        producer.generate("Say hello.", model=MODEL).get(timeout=WAIT)
        worker.stop()
    publish = next(s for s in spans.get_finished_spans() if s.name.startswith("publish "))

    log = worker.log_text()
    assert f'"trace_id": "0x{publish.context.trace_id:032x}"' in log
    assert f'"parent_id": "0x{publish.context.span_id:016x}"' in log
    assert f'"name": "text_completion {MODEL}"' in log
    assert '"service.name": "avocado-worker"' in log
