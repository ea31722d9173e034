"""Cancelling a job through the real queue (from Python, ``DELETE /jobs/{id}`` on the gateway,
or a gateway client that leaves before its answer is out): a queued one never reaches its
model, a running one has its inference stream closed before the answer's end; either way the
lock is free and ``ml_results`` says CANCELLED."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from avocado_shared import JobFailed, JobStatus, Producer
from avocado_shared.routing import Lane
from avocado_shared.streams import EntryKind, JobStream
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.rabbit import lane_queue, queue_depth
from tests.services import REDIS_URL, wait_for

WAIT = 60
TOKENS = 200


@pytest.fixture
def slow_sim() -> Iterator[OllamaSimulator]:
    """A simulator of this test only, 20 tokens a second: a 200-token answer takes 10 s."""
    with OllamaSimulator(SimConfig(default_tokens=TOKENS, tokens_per_s=20)) as sim:
        yield sim


def _assert_recorded_cancelled(producer: Producer, job_id: str) -> None:
    row = producer.results.get(job_id)
    assert row is not None
    assert row.status is JobStatus.CANCELLED


def _locks(key_prefix: str, key: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    return [k for k in client.scan_iter(f"{key_prefix}lock:*") if key in k]


def test_a_queued_job_cancelled_never_runs(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory, key_prefix: str
) -> None:
    key = f"cancel-{uuid.uuid4().hex[:8]}"
    handle = producer.generate("Never mind.", idempotency_key=key)  # no worker yet: queued
    producer.cancel(handle.id)
    worker_factory(slow_sim.url)

    with pytest.raises(JobFailed, match="JobCancelled: cancelled on request before it ran"):
        handle.get(timeout=WAIT)

    assert slow_sim.generation_calls == 0
    _assert_recorded_cancelled(producer, handle.id)
    assert not _locks(key_prefix, key)
    # Its stream ended too: a reader waiting for the answer (the gateway) stops now.
    ended = JobStream(redis.Redis.from_url(REDIS_URL), key_prefix, handle.id).snapshot().end
    assert ended is not None
    assert ended.kind is EntryKind.ERROR
    assert "cancelled on request before it ran" in str(ended.reason)
    again = producer.generate("Never mind.", idempotency_key=key)
    assert again.id != handle.id  # the identity is free for a new job
    producer.cancel(again.id)  # not left to run its 200 tokens while the worker stops


def test_a_running_generation_cancelled_closes_its_inference_stream(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory, key_prefix: str
) -> None:
    worker_factory(slow_sim.url)
    key = f"cancel-{uuid.uuid4().hex[:8]}"
    handle = producer.generate("Tell me everything.", idempotency_key=key)
    stream = JobStream(redis.Redis.from_url(REDIS_URL), key_prefix, handle.id)
    first = next(stream.entries(timeout_s=WAIT))  # the answer has begun
    assert first.kind is EntryKind.TEXT

    producer.cancel(handle.id)

    with pytest.raises(JobFailed, match="JobCancelled: cancelled on request while it generated"):
        handle.get(timeout=WAIT)
    # The worker closed its HTTP stream: the simulator's next write found no reader.
    wait_for(lambda: slow_sim.abandoned == 1, timeout=WAIT, what="the answer to be abandoned")
    assert slow_sim.in_flight == 0
    entries = stream.snapshot()
    assert entries.end is not None
    assert entries.end.kind is EntryKind.ERROR
    assert 0 < entries.chunks < TOKENS  # cut short, not run to its end
    _assert_recorded_cancelled(producer, handle.id)
    assert not _locks(key_prefix, key)


def test_delete_on_the_gateway_cancels_a_running_generation(
    producer: Producer,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    key_prefix: str,
) -> None:
    worker_factory(slow_sim.url)
    gateway = gateway_factory()
    handle = producer.generate("Tell me everything.")
    stream = JobStream(redis.Redis.from_url(REDIS_URL), key_prefix, handle.id)
    next(stream.entries(timeout_s=WAIT))  # the answer has begun

    answer = httpx.delete(f"{gateway.url}/jobs/{handle.id}", timeout=WAIT)

    assert answer.status_code == 202
    assert answer.json() == {"id": handle.id, "status": "cancelling"}
    with pytest.raises(JobFailed, match="JobCancelled"):
        handle.get(timeout=WAIT)
    wait_for(lambda: slow_sim.abandoned == 1, timeout=WAIT, what="the answer to be abandoned")
    _assert_recorded_cancelled(producer, handle.id)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "llama3.2:1b", "prompt": "Tell me everything."}),
        (
            "/v1/chat/completions",
            {
                "model": "llama3.2:1b",
                "stream": True,
                "messages": [{"role": "user", "content": "Tell me everything."}],
            },
        ),
    ],
)
def test_a_client_that_leaves_mid_stream_cancels_its_job(
    producer: Producer,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    path: str,
    body: dict[str, object],
) -> None:
    worker_factory(slow_sim.url)
    gateway = gateway_factory()

    with httpx.stream("POST", f"{gateway.url}{path}", json=body, timeout=WAIT) as answer:
        assert answer.status_code == 200
        job_id = answer.headers["x-avocado-job-id"]
        next(answer.iter_lines())  # the first piece came; then the client goes away

    with pytest.raises(JobFailed, match="JobCancelled"):
        producer.handle(job_id).get(timeout=WAIT)
    wait_for(lambda: slow_sim.abandoned == 1, timeout=WAIT, what="the answer to be abandoned")
    _assert_recorded_cancelled(producer, job_id)


def _request(path: str, text: str, stream: bool) -> dict[str, object]:
    """A generation request of either API asking ``text``."""
    if path == "/api/generate":
        return {"model": "llama3.2:1b", "prompt": text, "stream": stream}
    return {
        "model": "llama3.2:1b",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }


def _ask(gateway: InProcessGateway, path: str, body: dict[str, object]) -> socket.socket:
    """``body`` posted to ``path`` on a connection of its own, no answer read: closing the
    socket is the client going away, whatever it was waiting for."""
    url = urlsplit(gateway.url)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    connection = socket.create_connection((url.hostname, url.port))
    connection.sendall(head.encode() + data)
    return connection


def _cancel_flags(key_prefix: str) -> set[str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    return set(client.scan_iter(f"{key_prefix}cancel:*"))


def _cancelled_job(key_prefix: str, before: set[str]) -> str:
    """The job whose cancel flag appears now (the gateway cancelled it), by its id."""
    new: set[str] = set()

    def flagged() -> bool:
        new.update(_cancel_flags(key_prefix) - before)
        return bool(new)

    wait_for(flagged, timeout=WAIT, what="the gateway to cancel the job of the client that left")
    [key] = new
    return key.removeprefix(f"{key_prefix}cancel:")


# Answered in one piece (Ollama's ``stream: false``, OpenAI's default): the client sees
# nothing until the whole answer is done.
WHOLE = ["/api/generate", "/v1/chat/completions"]


@pytest.mark.parametrize("path", WHOLE)
def test_a_client_that_leaves_before_its_whole_answer_cancels_its_job(
    producer: Producer,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    key_prefix: str,
    path: str,
) -> None:
    worker_factory(slow_sim.url)
    gateway = gateway_factory()
    before = _cancel_flags(key_prefix)

    client = _ask(gateway, path, _request(path, "Tell me everything.", stream=False))
    assert slow_sim.wait_in_flight(1, timeout=WAIT)  # its job generates; then the client leaves
    client.close()

    job_id = _cancelled_job(key_prefix, before)
    with pytest.raises(JobFailed, match="JobCancelled: cancelled on request while it generated"):
        producer.handle(job_id).get(timeout=WAIT)
    wait_for(lambda: slow_sim.abandoned == 1, timeout=WAIT, what="the answer to be abandoned")
    _assert_recorded_cancelled(producer, job_id)
    assert not redis.Redis.from_url(REDIS_URL).exists(f"{key_prefix}run:{job_id}")  # its lease


@pytest.mark.parametrize(
    ("path", "stream"), [(path, False) for path in WHOLE] + [("/api/chat", True)]
)
def test_a_client_that_leaves_while_its_job_is_queued_cancels_it_before_it_runs(
    producer: Producer,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    key_prefix: str,
    path: str,
    stream: bool,
) -> None:
    # No worker yet: the job waits in the queue, a streamed answer for its first piece.
    gateway = gateway_factory(hold_unserved=True)
    queue = lane_queue(Lane.INTERACTIVE)
    before, queued = _cancel_flags(key_prefix), queue_depth(producer, queue)
    question = f"Never mind ({uuid.uuid4().hex[:8]})."

    client = _ask(gateway, path, _request(path, question, stream))
    wait_for(
        lambda: queue_depth(producer, queue) == queued + 1,
        timeout=WAIT,
        what="the gateway to queue the job",
    )
    client.close()

    job_id = _cancelled_job(key_prefix, before)
    worker_factory(slow_sim.url)
    with pytest.raises(JobFailed, match="JobCancelled: cancelled on request before it ran"):
        producer.handle(job_id).get(timeout=WAIT)
    assert not [r for r in slow_sim.requests.snapshot() if question in json.dumps(r.body)]
    _assert_recorded_cancelled(producer, job_id)
