"""Token streams through the real queue: a job's chunks are readable while it runs, the
stream is the stored result, and it survives its worker's death with no repeated and no
missing text."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from avocado_shared import JobFailed, Producer, ResultStore, Usage
from avocado_shared.contracts import FunctionCall, ToolCall
from avocado_shared.streams import (
    EntryKind,
    JobStream,
    StreamEntry,
    StreamFailed,
    done_fields,
    error_fields,
    joined,
    text_fields,
)
from avocado_shared.topology import GENERATE_TASK
from avocado_sim import OllamaSimulator
from ollama_worker.ollama import OllamaClient
from tests.conftest import WorkerFactory
from tests.midanswer import ASK, MODEL, TOKENS, continued_from, longest_gap
from tests.services import REDIS_URL
from tests.tools import WEATHER

logger = logging.getLogger(__name__)

WAIT = 90


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    made = redis.Redis.from_url(REDIS_URL)
    yield made
    made.close()


@dataclass
class Rig:
    """What every test here drives: the producer, the slow simulator, workers on it (their
    results in ``database``), the streams, and the answers they must end up with."""

    producer: Producer
    sim: OllamaSimulator
    workers: WorkerFactory
    client: redis.Redis
    key_prefix: str
    reference: OllamaClient
    database: str

    def stream(self, job_id: str) -> JobStream:
        return JobStream(self.client, self.key_prefix, job_id)

    def stored_text(self, job_id: str) -> str:
        with ResultStore.open(self.database) as store:
            row = store.get(job_id)
        assert row is not None
        assert row.result is not None
        return str(row.result["text"])

    def send(self, job_id: str) -> Any:
        """The job asking ``ASK`` under ``job_id``, as a producer of another language sends it."""
        request = {"request": {"prompt": ASK}}
        return self.producer.app.send_task(GENERATE_TASK, kwargs=request, task_id=job_id)

    def write(self, job_id: str, *entries: dict[str, str]) -> None:
        for fields in entries:
            self.client.xadd(self.stream(job_id).key, fields)  # type: ignore[arg-type]


@pytest.fixture
def rig(
    producer: Producer,
    midanswer_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    client: redis.Redis,
    key_prefix: str,
    uninterrupted: OllamaClient,
    tmp_path: Path,
) -> Rig:
    database = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    return Rig(producer, midanswer_sim, worker_factory, client, key_prefix, uninterrupted, database)


def _ms(entry: StreamEntry) -> int:
    return int(entry.id.split("-")[0])


def test_chunks_are_readable_while_the_job_runs_and_make_the_stored_result(rig: Rig) -> None:
    rig.workers(rig.sim.url, AVOCADO_DATABASE_URL=rig.database)
    handle = rig.producer.generate(ASK)
    entries = rig.stream(handle.id).entries(timeout_s=WAIT)

    first = next(entries)

    assert first.kind is EntryKind.TEXT
    assert not handle.ready()  # the first token is out, 29 more at 10 a second to come
    rest = list(entries)
    result = handle.get(timeout=WAIT)
    text = joined([first, *rest])
    assert text == result.text == rig.reference.generate(MODEL, ASK).text
    assert rig.stored_text(handle.id) == text
    assert rest[-1].kind is EntryKind.DONE
    assert rest[-1].usage is not None
    assert rest[-1].usage.completion_tokens == result.completion_tokens == TOKENS
    assert rest[-1].length == len(text)  # the end says how much text the stream holds


@pytest.mark.parametrize(
    ("backend", "kind"),
    [("ollama", "prompt"), ("ollama", "chat"), ("openai", "chat")],
)
def test_a_sigkilled_worker_s_answer_is_continued_by_another_with_nothing_repeated(
    rig: Rig, backend: str, kind: str
) -> None:
    env = {"AVOCADO_DATABASE_URL": rig.database, "AVOCADO_JOB_LEASE_S": "3"}
    if backend == "openai":
        env.update(AVOCADO_BACKEND="openai", AVOCADO_BACKEND_URL=f"{rig.sim.url}/v1")
    doomed = rig.workers.process(rig.sim.url, concurrency=1, **env)
    question = f"{ASK} ({uuid.uuid4().hex[:6]})"
    messages = [{"role": "user", "content": question}]
    if kind == "prompt":
        handle = rig.producer.generate(question)
    else:
        handle = rig.producer.generate(messages=messages)
    stream = rig.stream(handle.id)
    seen: list[StreamEntry] = []
    for entry in stream.entries(timeout_s=WAIT):
        seen.append(entry)
        if len(seen) == 5:
            break

    doomed.kill()
    killed = time.monotonic()
    rig.workers(rig.sim.url, concurrency=1, **env)
    after_kill: list[float] = []
    for entry in stream.entries(after=seen[-1].id, timeout_s=WAIT):
        after_kill.append(time.monotonic())
        seen.append(entry)

    result = handle.get(timeout=WAIT)
    expected = rig.reference.chat(MODEL, messages).text
    assert [e.kind for e in seen[:-1]] == [EntryKind.TEXT] * (len(seen) - 1)
    assert seen[-1].kind is EntryKind.DONE
    assert seen[-1].length == len(expected)  # the continued answer's whole, not its part
    assert joined(seen) == expected  # nothing repeated, nothing missing
    assert result.text == expected
    assert rig.stored_text(handle.id) == expected
    continued = continued_from(
        rig.sim, "/v1/chat/completions" if backend == "openai" else "/api/chat"
    )
    assert expected.startswith(continued)
    assert len(continued) >= len(joined(seen[:5]))
    logger.info(
        "SIGKILL mid-answer (%s, %s): the stream paused %d ms between two chunks (the "
        "dead worker's lease, %ss, then the continuation); the reader waited %.2f s after "
        "the kill for its first new entry",
        backend,
        kind,
        longest_gap([_ms(e) for e in seen]),
        env["AVOCADO_JOB_LEASE_S"],
        after_kill[0] - killed,
    )


def test_a_connection_cut_mid_answer_is_continued_on_retry(rig: Rig) -> None:
    rig.workers(rig.sim.url)
    rig.sim.config.drop_first = 1  # the first answer stops after one token

    result = rig.producer.generate(ASK).get(timeout=WAIT)

    entries = list(rig.stream(result.job_id).entries(timeout_s=WAIT))
    assert EntryKind.RESTART not in [e.kind for e in entries]
    assert joined(entries) == result.text == rig.reference.generate(MODEL, ASK).text
    first, second = rig.sim.requests.to("/api/generate"), rig.sim.requests.to("/api/chat")
    assert len(first) == len(second) == 1
    assert second[0].body["messages"][-1] == {"role": "assistant", "content": entries[0].text}


def test_a_server_that_cannot_continue_restarts_the_stream_and_readers_drop_the_partial(
    rig: Rig,
) -> None:
    rig.workers(rig.sim.url, AVOCADO_STREAM_RESUME="restart")
    rig.sim.config.drop_first = 1

    result = rig.producer.generate(ASK).get(timeout=WAIT)

    stream = rig.stream(result.job_id)
    entries = list(stream.entries(timeout_s=WAIT))
    assert [e.kind for e in entries][:2] == [EntryKind.TEXT, EntryKind.RESTART]
    assert stream.text(timeout_s=WAIT) == joined(entries) == result.text
    assert result.text == rig.reference.generate(MODEL, ASK).text
    assert len(rig.sim.requests.to("/api/generate")) == 2  # asked anew, not continued
    assert not rig.sim.requests.to("/api/chat")


def test_a_failed_job_ends_its_stream_with_the_reason(rig: Rig) -> None:
    rig.workers(rig.sim.url)
    rig.sim.config.fail_status = 400
    rig.sim.config.fail_first = 1

    handle = rig.producer.generate(ASK)

    with pytest.raises(JobFailed):
        handle.get(timeout=WAIT)
    with pytest.raises(StreamFailed, match="OllamaRejected"):
        rig.stream(handle.id).text(timeout_s=WAIT)


def test_a_stream_that_ended_whole_is_the_result_without_asking_the_server_again(
    rig: Rig,
) -> None:
    # Its worker wrote the last entry and died before storing the result.
    job_id = uuid.uuid4().hex
    usage = Usage(model=MODEL, done_reason="stop", prompt_tokens=4, completion_tokens=2)
    rig.write(job_id, text_fields("Whole"), text_fields(" answer."), done_fields(usage))
    rig.workers(rig.sim.url)

    assert rig.send(job_id).get(timeout=WAIT)["text"] == "Whole answer."
    assert rig.sim.generation_calls == 0
    assert rig.stream(job_id).text(timeout_s=WAIT) == "Whole answer."


def test_a_job_run_again_after_it_failed_streams_afresh(rig: Rig) -> None:
    # A dead letter replayed under its job id, say.
    job_id = uuid.uuid4().hex
    rig.write(job_id, text_fields("Half an"), error_fields("JobTimedOut: past 2s"))
    rig.workers(rig.sim.url)

    expected = rig.reference.generate(MODEL, ASK).text
    assert rig.send(job_id).get(timeout=WAIT)["text"] == expected
    assert rig.stream(job_id).text(timeout_s=WAIT) == expected


def _send_chat_with_tools(rig: Rig, job_id: str) -> Any:
    request = {"messages": [{"role": "user", "content": ASK}], "tools": [WEATHER]}
    return rig.producer.app.send_task(GENERATE_TASK, kwargs={"request": request}, task_id=job_id)


def test_an_answer_that_may_call_tools_starts_over_instead_of_continuing(rig: Rig) -> None:
    # Its worker streamed some text and died: no server continues that into a tool call.
    job_id = uuid.uuid4().hex
    rig.write(job_id, text_fields("Let me"))
    rig.workers(rig.sim.url)

    result = _send_chat_with_tools(rig, job_id).get(timeout=WAIT)

    entries = list(rig.stream(job_id).entries(timeout_s=WAIT))
    assert [e.kind for e in entries] == [EntryKind.TEXT, EntryKind.RESTART, EntryKind.DONE]
    assert entries[1].reason == "an answer that may call tools cannot be continued"
    assert [c["function"]["name"] for c in result["tool_calls"]] == ["weather"]
    assert [c.model_dump() for c in entries[-1].tool_calls] == result["tool_calls"]
    asked = rig.sim.requests.last("/api/chat").body["messages"]
    assert asked == [{"role": "user", "content": ASK}]  # asked anew, no trailing assistant


def test_tool_calls_of_a_stream_that_ended_whole_are_the_result(rig: Rig) -> None:
    # Its worker wrote the end, with the calls, and died before storing the result.
    job_id = uuid.uuid4().hex
    call = ToolCall(id="call_1", function=FunctionCall(name="weather", arguments='{"city":"x"}'))
    usage = Usage(model=MODEL, done_reason="stop", prompt_tokens=4)
    rig.write(job_id, done_fields(usage, length=0, tool_calls=[call]))
    rig.workers(rig.sim.url)

    result = _send_chat_with_tools(rig, job_id).get(timeout=WAIT)

    assert result["tool_calls"] == [call.model_dump()]
    assert result["text"] == ""
    assert rig.sim.generation_calls == 0
