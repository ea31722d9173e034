"""A streamed answer that calls tools outlives its worker: the worker (a subprocess) is
SIGKILLed while its server is answering, another takes the redelivered job and asks anew, and
the client (the ``openai`` SDK, streamed) reads the tool calls once, whole, with no error: a
stream carries tool calls only in its final entry, so a dead worker left none half given."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from avocado_shared import JobStatus, Producer
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.gateway_clients import Fleet
from tests.processes import wait_for
from tests.tools import WEATHER

logger = logging.getLogger(__name__)

MODEL = "llama3.2:1b"
WAIT = 90
LEASE_S = "3"  # the dead worker's lease delays its job's redelivery by at most this
# The backend's path, and the worker's settings for it beyond the server's URL.
BACKENDS = {
    "ollama": ("/api/chat", {}),
    "openai": ("/v1/chat/completions", {"AVOCADO_BACKEND": "openai"}),
}


@pytest.fixture
def slow_sim() -> Iterator[OllamaSimulator]:
    """A simulator that takes a second before it answers, then streams 4 chunks a second
    (OpenAI's call arrives in several deltas): a worker dies while its server answers."""
    with OllamaSimulator(SimConfig(models=[MODEL], latency_ms=1000, tokens_per_s=4)) as sim:
        yield sim


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_tool_call_stream_outlives_its_worker(
    backend: str,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    producer: Producer,
    gateway_factory: Callable[..., InProcessGateway],
) -> None:
    path, extra = BACKENDS[backend]
    env = {"AVOCADO_JOB_LEASE_S": LEASE_S, **extra}
    if backend == "openai":
        env["AVOCADO_BACKEND_URL"] = f"{slow_sim.url}/v1"
    doomed = worker_factory.process(slow_sim.url, concurrency=1, **env)
    fleet = Fleet(gateway_factory(), producer, WAIT)
    messages = [{"role": "user", "content": f"Weather? ({uuid.uuid4().hex[:6]})"}]

    def read() -> list[object]:
        stream = fleet.openai().chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            stream=True,
        )
        return list(stream)

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read)
        wait_for(lambda: slow_sim.requests.to(path), WAIT, f"the worker's call to {path}")
        doomed.kill()
        killed_at = time.monotonic()
        worker_factory(slow_sim.url, concurrency=1, **env)
        chunks = reading.result(timeout=WAIT)
    logger.info(
        "SIGKILL while the server answered a tool call (%s): the client's calls came %.2f s "
        "after the kill",
        backend,
        time.monotonic() - killed_at,
    )

    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]  # type: ignore[attr-defined]
    assert [d.id for d in deltas if d.id] == [deltas[0].id]  # one call, named once
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert isinstance(json.loads(arguments), dict)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"  # type: ignore[attr-defined]
    job_id = chunks[0].id.removeprefix("chatcmpl-")  # type: ignore[attr-defined]
    [stored] = fleet.result(job_id).tool_calls
    assert (stored.id, stored.function.arguments) == (deltas[0].id, arguments)
    row = producer.results.get(job_id)
    assert row is not None
    assert (row.status, row.attempts) == (JobStatus.SUCCESS, 2)  # the killed one, the next
    assert len(slow_sim.requests.to(path)) == 2  # asked anew: nothing of the first was given
