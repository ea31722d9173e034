"""OpenAI's Batch API through the real queue, on the simulator: the ``openai`` SDK's own flow
(``files.create``, ``batches.create``, polling ``batches.retrieve``, ``files.content`` of the
output and error files), each line's answer read with the SDK's own models; a file that fails
its checks queues nothing; a cancelled batch keeps every answer made; a batch belongs to its
key."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import amqp
import httpx
import openai
import pytest
from kombu import Queue
from openai.types import Batch, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion

from avocado_infer.batches import BatchStore, line_job_id
from avocado_shared import Producer, Settings
from avocado_shared.keys import KeyStore
from avocado_shared.routing import Lane, lane_queue_name
from avocado_sim import OllamaSimulator, Outcome, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.infer_http import redis_client, unique
from tests.inprocess import InProcessWorker
from tests.processes import wait_for
from tests.rabbit import queue_depth
from tests.services import run_cli, service_env

WAIT = 90
CHAT = "llama3.2:1b"
EMBEDDING = "all-minilm"
FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    """This module's simulated Ollama, a chat and an embedding model (conftest's ``worker``
    runs on it)."""
    with OllamaSimulator(SimConfig(models=[CHAT, EMBEDDING])) as server:
        yield server


@pytest.fixture
def gateway(
    worker: InProcessWorker,
    sim: OllamaSimulator,
    gateway_factory: Callable[..., InProcessGateway],
    tmp_path: Path,
) -> InProcessGateway:
    """A gateway of one test (files in its own directory, a window of four lines), before the
    module's worker; the simulator's log cleared and no delay."""
    sim.clear()
    sim.config.latency_ms = 0
    return gateway_factory(files_dir=tmp_path / "files", batch_poll_s=0.1, batch_window=4)


def _sdk(gateway: InProcessGateway, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, timeout=WAIT, max_retries=0)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _chat(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": CHAT, "messages": messages, **body},
    }


def _ended(sdk: openai.OpenAI, batch_id: str) -> Batch:
    return wait_for(
        lambda: (found := sdk.batches.retrieve(batch_id)).status in FINAL and found,
        timeout=WAIT,
        what=f"batch {batch_id} to end",
    )


def _lines(sdk: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A batch's output or error file, by custom id (each once)."""
    if file_id is None:
        return {}
    records = [json.loads(raw) for raw in sdk.files.content(file_id).text.splitlines()]
    by_id = {record["custom_id"]: record for record in records}
    assert len(by_id) == len(records)
    return by_id


def _part_answered(
    sdk: openai.OpenAI, sim: OllamaSimulator, count: int, answered: int
) -> tuple[list[dict[str, Any]], Batch]:
    """A batch of ``count`` chat lines, 150 ms each, once ``answered`` of them are."""
    sim.config.latency_ms = 150
    lines = [_chat(f"q{i}", f"Question {i}?") for i in range(count)]
    uploaded = sdk.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def done() -> int:
        counts = sdk.batches.retrieve(made.id).request_counts
        return 0 if counts is None else counts.completed

    wait_for(lambda: done() >= answered, timeout=WAIT, what=f"{answered} answers")
    return lines, made


def test_the_sdk_runs_a_chat_batch_and_reads_its_answers(
    gateway: InProcessGateway, sim: OllamaSimulator
) -> None:
    sdk = _sdk(gateway)
    lines = [_chat(f"q{i}", f"Question {i}?") for i in range(6)]
    lines.append(_chat("refused", "Too long?", max_tokens=0))  # the job contract refuses
    uploaded = sdk.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")

    made = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )
    ended = _ended(sdk, made.id)

    assert made.status == "validating"
    assert ended.status == "completed"
    assert ended.metadata == {"run": "test"}
    assert ended.request_counts is not None
    assert (ended.request_counts.total, ended.request_counts.completed) == (7, 6)
    assert ended.request_counts.failed == 1
    assert ended.in_progress_at is not None
    assert ended.completed_at is not None
    output = _lines(sdk, ended.output_file_id)
    assert sorted(output) == [f"q{i}" for i in range(6)]
    for record in output.values():
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        answer = ChatCompletion.model_validate(record["response"]["body"])
        assert answer.choices[0].message.content
        assert answer.model == CHAT
    errors = _lines(sdk, ended.error_file_id)
    assert list(errors) == ["refused"]
    assert errors["refused"]["error"]["code"] == "invalid_request"
    assert "max_tokens" in errors["refused"]["error"]["message"]
    assert len(sim.requests.to("/api/chat")) == 6


def test_a_completions_and_an_embeddings_batch(gateway: InProcessGateway) -> None:
    sdk = _sdk(gateway)
    prompts = [
        {"custom_id": "p", "method": "POST", "url": "/v1/completions"}
        | {"body": {"model": CHAT, "prompt": "Once upon a time"}}
    ]
    texts = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings"}
        | {"body": {"model": EMBEDDING, "input": [f"text {i}", "more"]}}
        for i in range(3)
    ]
    runs = {}
    for endpoint, lines in (("/v1/completions", prompts), ("/v1/embeddings", texts)):
        uploaded = sdk.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
        made = sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )
        runs[endpoint] = _ended(sdk, made.id)

    completion = _lines(sdk, runs["/v1/completions"].output_file_id)["p"]
    assert Completion.model_validate(completion["response"]["body"]).choices[0].text
    embedded = _lines(sdk, runs["/v1/embeddings"].output_file_id)
    assert sorted(embedded) == ["e0", "e1", "e2"]
    for record in embedded.values():
        vectors = CreateEmbeddingResponse.model_validate(record["response"]["body"])
        assert len(vectors.data) == 2


def test_a_file_that_fails_its_checks_queues_nothing(
    gateway: InProcessGateway, sim: OllamaSimulator
) -> None:
    sdk = _sdk(gateway)
    body = _chat("x", "Hi?")["body"]
    raw = b"\n".join(
        [
            json.dumps(_chat("a", "Hi?")).encode(),
            b"{not json",
            json.dumps(_chat("a", "Again?")).encode(),
            json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": body}).encode(),
            json.dumps(_chat("b", "Hi?") | {"url": "/v1/embeddings"}).encode(),
            json.dumps(_chat("c", "Hi?") | {"method": "GET"}).encode(),
        ]
    )
    uploaded = sdk.files.create(file=("bad.jsonl", raw), purpose="batch")

    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    ended = _ended(sdk, made.id)

    assert ended.status == "failed"
    assert ended.failed_at is not None
    assert ended.errors is not None
    assert ended.errors.data is not None
    found = [(e.line, e.code) for e in ended.errors.data]
    assert found == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "missing_required_parameter"),
        (5, "mismatched_endpoint"),
        (6, "invalid_method"),
    ]
    assert (ended.output_file_id, ended.error_file_id) == (None, None)
    assert sim.requests.to("/api/chat") == []


def test_a_repeated_custom_id_deep_in_a_large_file_is_named_by_its_line(
    gateway: InProcessGateway, sim: OllamaSimulator, settings: Settings
) -> None:
    """The ids are checked in Redis a chunk at a time, not held by the gateway: a repeat
    10,000 lines after the first is found, and the check leaves no key behind."""
    sdk = _sdk(gateway)
    lines = [_chat(f"r{i}", "Hi?") for i in range(10_500)]
    lines[10_200] = _chat("r16", "Again?")
    uploaded = sdk.files.create(file=("big.jsonl", _jsonl(lines)), purpose="batch")

    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    ended = _ended(sdk, made.id)

    assert ended.status == "failed"
    assert ended.errors is not None
    assert ended.errors.data is not None
    assert [(e.line, e.code) for e in ended.errors.data] == [(10_201, "duplicate_custom_id")]
    assert ended.errors.data[0].message == (
        "The custom_id 'r16' is used more than once in this file (first on line 17)."
    )
    assert sim.requests.to("/api/chat") == []
    with redis_client() as client:
        assert client.keys(f"{settings.key_prefix}batch:{made.id}:ids*") == []


def test_a_cancelled_batch_keeps_every_answer_made(
    gateway: InProcessGateway, sim: OllamaSimulator
) -> None:
    sdk = _sdk(gateway)
    lines, made = _part_answered(sdk, sim, 40, answered=20)  # half way

    cancelling = sdk.batches.cancel(made.id)
    ended = _ended(sdk, made.id)

    assert cancelling.status == "cancelling"
    assert ended.status == "cancelled"
    assert ended.cancelling_at is not None
    assert ended.cancelled_at is not None
    output = _lines(sdk, ended.output_file_id)
    errors = _lines(sdk, ended.error_file_id)
    assert set(output) | set(errors) == {line["custom_id"] for line in lines}
    assert not set(output) & set(errors)
    assert len(output) >= 20
    assert errors
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    calls = Counter(
        (r.body["messages"][0]["content"], r.outcome) for r in sim.requests.to("/api/chat")
    )
    print(f"cancelled: {len(output)} answers, {len(errors)} errors, calls {dict(sim.outcomes)}")
    # Every answer in the output is one the model made once; besides them, only the window's
    # lines (4) were in a model call when the cancel came: cut, or sent whole by the simulator
    # (all its tokens at once) while their worker, which had seen the cancel, read them.
    by_prompt = {line["custom_id"]: line["body"]["messages"][0]["content"] for line in lines}
    assert all(calls[by_prompt[custom_id], Outcome.ANSWERED] == 1 for custom_id in output)
    assert set(sim.outcomes) <= {Outcome.ANSWERED, Outcome.CUT}
    assert sim.outcomes.total() - len(output) <= 4
    assert ended.request_counts is not None
    assert (ended.request_counts.completed, ended.request_counts.failed) == (
        len(output),
        len(errors),
    )


def test_a_batch_belongs_to_its_key(
    worker: InProcessWorker,
    gateway_factory: Callable[..., InProcessGateway],
    keys: KeyStore,
    tmp_path: Path,
) -> None:
    gateway = gateway_factory(require_keys=True, files_dir=tmp_path, max_open_batches=1)
    a, b = (_sdk(gateway, keys.create(unique(who))[1]) for who in ("a", "b"))
    uploaded = a.files.create(file=("in.jsonl", _jsonl([_chat("q", "Hi?")])), purpose="batch")
    made = a.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    with pytest.raises(openai.NotFoundError, match=f"No such File object: {uploaded.id}"):
        b.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError, match=f"No batch found with id '{made.id}'"):
        b.batches.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.cancel(made.id)
    assert [found.id for found in b.batches.list()] == []
    with pytest.raises(openai.RateLimitError, match="AVOCADO_INFER_MAX_OPEN_BATCHES"):
        a.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert _ended(a, made.id).status == "completed"
    assert [found.id for found in a.batches.list()] == [made.id]


def test_the_avocado_command_submits_waits_and_reads_a_batch(
    worker: InProcessWorker,
    gateway_factory: Callable[..., InProcessGateway],
    keys: KeyStore,
    broker_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    gateway = gateway_factory(require_keys=True, files_dir=tmp_path / "files", batch_poll_s=0.1)
    secret = keys.create(unique("cli"))[1]
    env = service_env(
        broker_url, key_prefix, AVOCADO_GATEWAY_URL=gateway.url, AVOCADO_API_KEY=secret
    )
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_bytes(_jsonl([_chat("a", "Hi?"), _chat("b", "Bye?"), _chat("c", "X", n=2)]))
    bad.write_bytes(_jsonl([_chat("a", "Hi?"), _chat("a", "Again?")]))

    submitted = run_cli(env, "batch", "submit", str(good), "--wait", "--poll-s", "0.2")
    batch_id = submitted.stdout.strip()
    output = run_cli(env, "batch", "results", batch_id)
    errors = run_cli(env, "batch", "results", batch_id, "--errors")
    status = run_cli(env, "batch", "status", batch_id)
    listed = run_cli(env, "batch", "list")
    failed = run_cli(env, "batch", "submit", str(bad), "--wait", "--poll-s", "0.2")
    unknown = run_cli(env, "batch", "cancel", "batch_nope")
    keyless = run_cli({**env, "AVOCADO_API_KEY": ""}, "batch", "list")

    assert submitted.returncode == 0, submitted.stderr
    assert batch_id.startswith("batch_")
    assert f"{batch_id} completed" in submitted.stderr
    assert "3/3 (1 failed)" in submitted.stderr
    assert sorted(json.loads(line)["custom_id"] for line in output.stdout.splitlines()) == [
        "a",
        "b",
    ]
    assert [json.loads(line)["custom_id"] for line in errors.stdout.splitlines()] == ["c"]
    assert json.loads(status.stdout)["status"] == "completed"
    assert batch_id in listed.stdout
    assert failed.returncode == 3
    assert "failed: line 2: The custom_id 'a' is used more than once" in failed.stderr
    assert (unknown.returncode, unknown.stderr.strip()) == (
        4,
        "avocado: No batch found with id 'batch_nope'",
    )
    assert keyless.returncode == 1
    assert "no API key" in keyless.stderr
    assert secret not in submitted.stderr + submitted.stdout


def test_a_batch_past_its_window_expires_with_every_answer_made(
    gateway: InProcessGateway, sim: OllamaSimulator, settings: Settings
) -> None:
    sdk = _sdk(gateway)
    lines, made = _part_answered(sdk, sim, 30, answered=3)
    # Its 24 hours pass: its record says so, as it would a day later (again until the feeder,
    # which saves the record after each of its moves, has read it).
    with redis_client() as client:
        store = BatchStore(client, settings.key_prefix, retention_s=60)

        def expired() -> bool:
            record = store.load(made.id)
            assert record is not None
            if record.ending == "batch_expired":
                return True
            store.save(replace(record, expires_at=record.created_at))
            return False

        wait_for(expired, timeout=WAIT, what="the feeder to see the batch expired")

    ended = _ended(sdk, made.id)

    assert ended.status == "expired"
    assert ended.expired_at is not None
    output = _lines(sdk, ended.output_file_id)
    errors = _lines(sdk, ended.error_file_id)
    assert len(output) >= 3
    assert set(output) | set(errors) == {line["custom_id"] for line in lines}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}


def test_a_gateway_that_stops_hands_its_batch_to_another_and_no_line_runs_twice(
    worker: InProcessWorker,
    sim: OllamaSimulator,
    gateway_factory: Callable[..., InProcessGateway],
    settings: Settings,
    tmp_path: Path,
) -> None:
    sim.clear()
    fields = {"files_dir": tmp_path / "files", "batch_poll_s": 0.1, "batch_window": 4}
    first = gateway_factory(**fields)
    lines, made = _part_answered(_sdk(first), sim, 30, answered=5)

    first.stop()
    second = gateway_factory(**fields)
    ended = _ended(_sdk(second), made.id)

    assert ended.status == "completed"
    output = _lines(_sdk(second), ended.output_file_id)
    assert sorted(output) == sorted(line["custom_id"] for line in lines)
    asked = [r.body["messages"][0]["content"] for r in sim.requests.to("/api/chat")]
    assert sorted(asked) == sorted(f"Question {i}?" for i in range(30))
    # The ended batch leaves no feeder keys behind.
    with redis_client() as client:
        assert client.keys(f"{settings.key_prefix}batch:{made.id}:*") == []


def test_a_batch_whose_file_is_deleted_fails_and_stops(
    gateway: InProcessGateway, sim: OllamaSimulator
) -> None:
    sdk = _sdk(gateway)
    _, made = _part_answered(sdk, sim, 30, answered=2)

    sdk.files.delete(made.input_file_id)
    ended = _ended(sdk, made.id)

    assert ended.status == "failed"
    assert ended.errors is not None
    assert ended.errors.data is not None
    assert [e.code for e in ended.errors.data] == ["file_not_found"]
    assert len(sim.requests.to("/api/chat")) < 30


def _waiting(producer: Producer, model: str) -> int:
    """The lines in the model's batch lane queue (none before the feeder declares it)."""
    try:
        return queue_depth(producer, lane_queue_name(model, Lane.BATCH))
    except amqp.exceptions.NotFound:
        return 0


def test_the_feeder_keeps_the_lane_within_the_queue_limit(
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    producer: Producer,
    tmp_path: Path,
) -> None:
    """No node serves the batch's model at first: the feeder queues lines up to
    AVOCADO_INFER_MAX_QUEUE and no further; a node that comes takes them all."""
    model = f"flow{uuid.uuid4().hex[:6]}:1b"
    gateway = gateway_factory(
        files_dir=tmp_path / "files", batch_poll_s=0.1, batch_window=20, max_queue=3
    )
    sdk = _sdk(gateway)
    lines = [_chat(f"q{i}", f"Question {i}?", model=model) for i in range(8)]
    uploaded = sdk.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def waiting() -> int:
        return _waiting(producer, model)

    depths = [wait_for(lambda: waiting() >= 3 and 3, what="three lines queued")]

    with OllamaSimulator(SimConfig(models=[model])) as late:
        worker_factory.process(late.url)

        def ended() -> Batch | None:
            depths.append(waiting())
            found = sdk.batches.retrieve(made.id)
            return found if found.status in FINAL else None

        done = wait_for(ended, timeout=WAIT, what="the batch to end")

    assert max(depths) == 3
    assert done.status == "completed"
    assert sorted(_lines(sdk, done.output_file_id)) == sorted(f"q{i}" for i in range(8))


def test_batches_and_files_are_listed_a_page_at_a_time(gateway: InProcessGateway) -> None:
    sdk = _sdk(gateway)
    uploaded = [
        sdk.files.create(file=(f"in{i}.jsonl", _jsonl([_chat("q", f"Hi {i}?")])), purpose="batch")
        for i in range(3)
    ]
    made = [
        sdk.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for file in uploaded
    ]
    newest = [batch.id for batch in reversed(made)]

    first = httpx.get(f"{gateway.url}/v1/batches", params={"limit": 2}).json()
    second = httpx.get(
        f"{gateway.url}/v1/batches", params={"limit": 2, "after": first["last_id"]}
    ).json()
    walked = [batch.id for batch in sdk.batches.list(limit=2)]  # the SDK follows every page
    files_first = sdk.files.list(purpose="batch", limit=2)
    files_rest = sdk.files.list(purpose="batch", limit=2, after=files_first.data[-1].id)

    assert [b["id"] for b in first["data"]] == newest[:2]
    assert (first["first_id"], first["last_id"], first["has_more"]) == (*newest[:2], True)
    assert second["data"][0]["id"] == newest[2]
    assert second["first_id"] == newest[2]
    assert walked[:3] == newest
    assert len(walked) == len(set(walked))
    assert files_first.has_more is True
    assert files_rest.has_more is False
    paged = [f.id for f in [*files_first.data, *files_rest.data]]
    assert sorted(paged) == sorted(f.id for f in uploaded)
    assert len(files_first.data) == 2


def test_an_ended_batch_is_kept_for_its_retention_then_forgotten(
    worker: InProcessWorker,
    gateway_factory: Callable[..., InProcessGateway],
    settings: Settings,
    tmp_path: Path,
) -> None:
    gateway = gateway_factory(files_dir=tmp_path, batch_poll_s=0.1, batch_retention_s=3)
    sdk = _sdk(gateway)
    uploaded = sdk.files.create(file=("in.jsonl", _jsonl([_chat("q", "Hi?")])), purpose="batch")
    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    ended = _ended(sdk, made.id)
    with redis_client() as client:
        left = client.ttl(f"{settings.key_prefix}batch:{made.id}")

    def forgotten() -> bool:
        try:
            sdk.batches.retrieve(made.id)
        except openai.NotFoundError:
            return True
        return False

    wait_for(forgotten, timeout=WAIT, what="the batch's record to expire")

    assert ended.status == "completed"
    assert 0 < left <= 3
    assert made.id not in [batch.id for batch in sdk.batches.list()]
    with redis_client() as client:
        assert client.zscore(f"{settings.key_prefix}batches", made.id) is None
    assert sdk.files.content(ended.output_file_id or "").text  # its files stay


def test_a_line_whose_job_is_dead_lettered_fails_at_once_with_its_reason(
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    producer: Producer,
    tmp_path: Path,
) -> None:
    """No node serves the batch's model at first, so its lines wait in their queue; one is
    taken off it and rejected, which RabbitMQ dead-letters: the batch counts that line failed
    at once (its job will never have a row), and a node that comes runs the rest."""
    model = f"dead{uuid.uuid4().hex[:6]}:1b"
    gateway = gateway_factory(files_dir=tmp_path / "files", batch_poll_s=0.1, batch_window=4)
    sdk = _sdk(gateway)
    lines = [_chat(f"q{i}", f"Question {i}?", model=model) for i in range(4)]
    uploaded = sdk.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(lambda: _waiting(producer, model) == 4, what="the lines queued")
    with producer.app.connection_for_write() as connection:
        queue = Queue(lane_queue_name(model, Lane.BATCH), no_declare=True)(connection.channel())
        taken = wait_for(lambda: queue.get(no_ack=False), what="a line's job")
        taken.reject(requeue=False)

    def failed() -> int:
        counts = sdk.batches.retrieve(made.id).request_counts
        return 0 if counts is None else counts.failed

    wait_for(lambda: failed() == 1, what="the dead-lettered line counted failed")
    with OllamaSimulator(SimConfig(models=[model])) as late:
        worker_factory.process(late.url)
        done = _ended(sdk, made.id)

    assert done.status == "completed"
    errors = _lines(sdk, done.error_file_id)
    assert len(errors) == 1
    ((custom_id, record),) = errors.items()
    assert line_job_id(made.id, custom_id) == taken.headers["id"]
    assert record["error"]["code"] == "job_dead_lettered"
    assert "rejected without requeue" in record["error"]["message"]
    assert record["response"]["status_code"] == 500
    output = _lines(sdk, done.output_file_id)
    assert sorted(output) == sorted(f"q{i}" for i in range(4) if f"q{i}" != custom_id)


def test_a_job_leaves_the_window_once_whoever_takes_it(settings: Settings) -> None:
    """Two feeders may count the same window: each job is counted by the one whose take
    removed it, and a take reports that per job, in the order asked."""
    with redis_client() as client:
        store = BatchStore(client, settings.key_prefix, retention_s=60)
        window = store.key("batch_take", ":running")
        client.sadd(window, "a", "b")
        try:
            assert store.take("batch_take", ":running", ["a", "c"]) == [True, False]
            assert store.take("batch_take", ":running", ["a", "b"]) == [False, True]
            assert store.take("batch_take", ":running", []) == []
            assert client.scard(window) == 0
        finally:
            client.delete(window)
