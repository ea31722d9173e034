"""An answer through the gateway outlives its worker: the worker (a subprocess) is SIGKILLed in
the middle of an ``ollama`` client's or the OpenAI SDK's stream, another takes the redelivered
job and continues its text, and the client reads the whole answer, nothing repeated, nothing
missing, no error: only a pause, which each test measures and logs."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from avocado_shared import JobStatus, Producer
from avocado_sim import OllamaSimulator
from ollama_worker.ollama import OllamaClient
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.gateway_clients import Fleet, assert_counts
from tests.midanswer import ASK, MODEL, continued_from, longest_gap

logger = logging.getLogger(__name__)

WAIT = 90
BEFORE_KILL = 5  # chunks the client reads before its worker dies
LEASE_S = "3"  # the dead worker's lease delays its job's redelivery by at most this


@dataclass
class Reader:
    """Reads a client's stream; once ``BEFORE_KILL`` chunks are in, kills the job's worker and
    starts another (in this process) to take the job over."""

    kill: Callable[[], None]
    takeover: Callable[[], None]
    texts: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each chunk arrived
    killed_at: float = 0.0

    def read(self, chunks: Iterable[Any], text: Callable[[Any], str | None]) -> list[Any]:
        """Every chunk of ``chunks``; the text of each in ``texts``."""
        read = []
        for chunk in chunks:
            self.times.append(time.monotonic())
            self.texts.append(text(chunk) or "")
            read.append(chunk)
            if len(read) == BEFORE_KILL:
                self.kill()
                self.killed_at = time.monotonic()
                self.takeover()
        assert len(read) > BEFORE_KILL, "the answer ended before its worker was killed"
        return read

    def report(self, api: str) -> None:
        after = next(t for t in self.times if t > self.killed_at)
        logger.info(
            "SIGKILL mid-stream through the gateway (%s): the client's longest pause between "
            "two chunks was %.2f s (lease %s s); its first chunk after the kill came %.2f s "
            "after it",
            api,
            longest_gap(self.times),
            LEASE_S,
            after - self.killed_at,
        )


@pytest.fixture
def reader(midanswer_sim: OllamaSimulator, worker_factory: WorkerFactory) -> Callable[[], Reader]:
    """A worker subprocess on the slow simulator, and a reader that kills it mid-answer."""
    env = {"AVOCADO_JOB_LEASE_S": LEASE_S}
    doomed = worker_factory.process(midanswer_sim.url, concurrency=1, **env)
    return lambda: Reader(
        doomed.kill, lambda: worker_factory(midanswer_sim.url, concurrency=1, **env)
    )


@pytest.fixture
def fleet(producer: Producer, gateway_factory: Callable[..., InProcessGateway]) -> Fleet:
    return Fleet(gateway_factory(), producer, WAIT)


def _assert_taken_over(fleet: Fleet, job_id: str) -> None:
    row = fleet.producer.results.get(job_id)
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.attempts == 2  # the killed one, then the one that finished it


@pytest.mark.parametrize("route", ["chat", "generate"])
def test_an_ollama_clients_stream_outlives_its_worker(
    fleet: Fleet,
    reader: Callable[[], Reader],
    midanswer_sim: OllamaSimulator,
    uninterrupted: OllamaClient,
    route: str,
) -> None:
    question = f"{ASK} ({uuid.uuid4().hex[:6]})"
    client = fleet.ollama()
    reading = reader()
    if route == "chat":
        messages = [{"role": "user", "content": question}]
        answer = client.chat(model=MODEL, messages=messages, stream=True)
        *pieces, final = reading.read(answer, lambda c: c.message.content)
        expected = uninterrupted.chat(MODEL, messages).text
    else:
        answer = client.generate(model=MODEL, prompt=question, stream=True)
        *pieces, final = reading.read(answer, lambda c: c.response)
        expected = uninterrupted.generate(MODEL, question).text

    text = "".join(reading.texts)
    assert text == expected  # nothing repeated, nothing missing
    assert all(c.done is False for c in pieces)
    result = fleet.last_result()
    assert result.text == text  # what the client read is what ml_results holds
    assert_counts(final, result)
    _assert_taken_over(fleet, fleet.job_ids[0])
    continued = continued_from(midanswer_sim, "/api/chat")
    assert text.startswith(continued)
    assert len(continued) >= len("".join(reading.texts[:BEFORE_KILL]))
    reading.report(f"ollama {route}")


def test_an_openai_sdk_stream_outlives_its_worker(
    fleet: Fleet,
    reader: Callable[[], Reader],
    midanswer_sim: OllamaSimulator,
    uninterrupted: OllamaClient,
) -> None:
    messages = [{"role": "user", "content": f"{ASK} ({uuid.uuid4().hex[:6]})"}]
    reading = reader()

    answer = fleet.openai().chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    *chunks, usage = reading.read(answer, lambda c: c.choices[0].delta.content if c.choices else "")

    text = "".join(reading.texts)
    assert text == uninterrupted.chat(MODEL, messages).text
    assert chunks[-1].choices[0].finish_reason == "stop"
    result = fleet.result(usage.id.removeprefix("chatcmpl-"))
    assert result.text == text
    assert usage.usage.completion_tokens == result.completion_tokens > 0
    _assert_taken_over(fleet, result.job_id)
    assert text.startswith(continued_from(midanswer_sim, "/api/chat"))
    reading.report("openai chat")
