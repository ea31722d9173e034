"""Both job kinds end to end: producer -> RabbitMQ quorum queue -> worker -> Ollama simulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from avocado_shared import GenerateResult, Producer, SummarizeResult
from avocado_shared.fleet import WorkerRegistry
from avocado_shared.redis_clients import redis_client
from avocado_shared.routing import Lane, lane_queue_name
from avocado_shared.store import JobStatus, ResultRow
from avocado_sim import OllamaSimulator
from tests.inprocess import InProcessWorker
from tests.processes import wait_for
from tests.rabbit import purge, queue_depth
from tests.services import WorkerProcess

pytestmark = pytest.mark.usefixtures("worker")

WAIT = 60


def _bodies(sim: OllamaSimulator, path: str) -> list[dict[str, object]]:
    return [r.body for r in sim.requests if r.path == path and isinstance(r.body, dict)]


def _rounds_after(
    registry: WorkerRegistry, worker: str, since: datetime, rounds: int
) -> Callable[[], bool]:
    """A condition: worker ``worker`` refreshed its fleet record ``rounds`` times since."""
    seen: set[datetime] = set()

    def done() -> bool:
        record = registry.get(worker)
        if record is not None and record.updated_at > since:
            seen.add(record.updated_at)
        return len(seen) >= rounds

    return done


def test_prompt_generation_returns_text_tokens_and_durations(
    producer: Producer, fresh_sim: OllamaSimulator, worker: WorkerProcess
) -> None:
    handle = producer.generate("Why is the sky blue?", system="Answer briefly.")
    result = handle.get(timeout=WAIT)

    assert isinstance(result, GenerateResult)
    assert result.job_id == handle.id
    assert result.text.strip()
    assert result.model == "llama3.2:1b"
    assert result.worker == worker.name
    assert result.prompt_tokens > 0
    assert result.completion_tokens > 0
    assert result.total_duration_ms > 0
    assert result.eval_duration_ms > 0
    assert result.done_reason == "stop"
    (body,) = _bodies(fresh_sim, "/api/generate")
    assert body["prompt"] == "Why is the sky blue?"
    assert body["system"] == "Answer briefly."
    assert body["stream"] is True


def test_chat_generation_goes_to_api_chat_with_system_first(
    producer: Producer, fresh_sim: OllamaSimulator
) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    result = producer.generate(messages=messages, system="Be terse.").get(timeout=WAIT)

    assert result.text.strip()
    assert result.completion_tokens > 0
    (body,) = _bodies(fresh_sim, "/api/chat")
    assert body["messages"] == [{"role": "system", "content": "Be terse."}, *messages]
    assert not _bodies(fresh_sim, "/api/generate")


def test_an_unwatched_job_runs_with_no_result_channel_and_no_celery_result(
    producer: Producer, fresh_sim: OllamaSimulator
) -> None:
    """A job published ``watched=False`` (a batch's line, read from ``ml_results``) leaves its
    publisher subscribed to nothing, and no Celery result behind; a watched one has both."""
    client = redis_client(producer.settings)
    backend = producer.app.backend
    watched = producer.submit(producer.generate_request("Name a colour."), Lane.BATCH)
    request = producer.generate_request("Name a fruit.")
    unwatched = producer.submit(request, Lane.BATCH, watched=False)
    channels = [backend.get_key_for_task(handle.id) for handle in (watched, unwatched)]

    assert [n for _, n in client.pubsub_numsub(*channels)] == [1, 0]
    assert watched.get(timeout=WAIT).text.strip()

    def ended() -> ResultRow | None:
        row = producer.results.get(unwatched.id)
        return row if row is not None and row.status is not JobStatus.STARTED else None

    row = wait_for(ended, timeout=WAIT, what="the unwatched job's row to say how it ended")
    assert row.status is JobStatus.SUCCESS, row.error
    assert [client.exists(channel) for channel in channels] == [1, 0]


def test_options_json_schema_and_keep_alive_are_passed_through(
    producer: Producer, fresh_sim: OllamaSimulator
) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "wavelength_nm": {"type": "integer"}},
        "required": ["colour", "wavelength_nm"],
    }
    handle = producer.generate(
        "Describe the sky as JSON.",
        options={"temperature": 0.1, "seed": 7, "num_predict": 40},
        format=schema,
        keep_alive="10m",
    )
    result = handle.get(timeout=WAIT)

    answer = json.loads(result.text)
    assert set(answer) >= {"colour", "wavelength_nm"}
    (body,) = _bodies(fresh_sim, "/api/generate")
    assert body["options"] == {"temperature": 0.1, "seed": 7, "num_predict": 40}
    assert body["format"] == schema
    assert body["keep_alive"] == "10m"


def test_num_predict_bounds_the_completion(producer: Producer, fresh_sim: OllamaSimulator) -> None:
    result = producer.generate("Count slowly.", options={"num_predict": 7}).get(timeout=WAIT)

    assert result.completion_tokens == 7
    assert result.done_reason == "length"


def test_json_format_gives_parseable_json(producer: Producer, fresh_sim: OllamaSimulator) -> None:
    result = producer.generate("List two colours.", format="json").get(timeout=WAIT)

    json.loads(result.text)
    assert _bodies(fresh_sim, "/api/generate")[0]["format"] == "json"


def test_missing_model_is_pulled_first(producer: Producer, fresh_sim: OllamaSimulator) -> None:
    assert "qwen2.5:0.5b" not in fresh_sim.config.models

    result = producer.generate("Hello", model="qwen2.5:0.5b").get(timeout=WAIT)

    assert result.model == "qwen2.5:0.5b"
    paths = [r.path for r in fresh_sim.requests if r.method == "POST"]
    assert paths.index("/api/pull") < paths.index("/api/generate")
    assert _bodies(fresh_sim, "/api/pull")[0]["model"] == "qwen2.5:0.5b"


def test_a_model_absent_from_the_hub_is_tried_once_and_its_job_waits_queued(
    producer: Producer, fresh_sim: OllamaSimulator, worker: InProcessWorker
) -> None:
    fresh_sim.config.hub = ["llama3.2:1b", "qwen2.5:0.5b"]
    registry = WorkerRegistry(redis_client(producer.settings), producer.settings.key_prefix)
    try:
        handle = producer.generate("Hello", model="no-such-model:7b")
        wait_for(lambda: _bodies(fresh_sim, "/api/pull"), timeout=WAIT, what="a pull")
        # Two more rounds of the worker's model follower after the failed pull.
        pulled_at = datetime.now(timezone.utc)
        wait_for(
            _rounds_after(registry, worker.name, pulled_at, 2),
            timeout=WAIT,
            what="two rounds of the model follower",
        )
    finally:
        fresh_sim.config.hub = None
    assert [b["model"] for b in _bodies(fresh_sim, "/api/pull")] == ["no-such-model:7b"]
    assert not _bodies(fresh_sim, "/api/generate")
    assert handle.state == "PENDING"
    assert queue_depth(producer, lane_queue_name("no-such-model:7b", Lane.BATCH)) == 1
    purge(producer, lane_queue_name("no-such-model:7b", Lane.BATCH))


def test_busy_ollama_is_retried_until_it_answers(
    producer: Producer, fresh_sim: OllamaSimulator
) -> None:
    fresh_sim.config.fail_status = 503
    fresh_sim.config.fail_first = 2

    result = producer.generate("Try again").get(timeout=WAIT)

    assert result.text.strip()
    assert len(_bodies(fresh_sim, "/api/generate")) == 3


def test_short_summary_runs_in_one_call(producer: Producer, fresh_sim: OllamaSimulator) -> None:
    text = "RabbitMQ quorum queues replicate messages with Raft. " * 5
    handle = producer.summarize("share-short", {"text": text, "title": "Queues"})
    result = handle.get(timeout=WAIT)

    assert isinstance(result, SummarizeResult)
    assert result.share_id == "share-short"
    assert result.summary
    assert result.chunks == 1
    assert result.completion_tokens > 0
    (body,) = _bodies(fresh_sim, "/api/generate")
    assert text.strip() in str(body["prompt"])
    assert "Title: Queues" in str(body["prompt"])
    assert body["options"] == {"num_ctx": 2048, "num_predict": 300}


def test_long_summary_is_chunked_within_the_context_then_combined(
    producer: Producer, fresh_sim: OllamaSimulator
) -> None:
    paragraph = (
        "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. "
        "Every evening the village gathers to share stories about the harvest. "
    )
    text = "\n\n".join(f"Section {i}. {paragraph * 3}" for i in range(40))
    result = producer.summarize(
        "share-long", text, options={"max_words": 50, "language": "French"}
    ).get(timeout=WAIT)

    bodies = _bodies(fresh_sim, "/api/generate")
    assert result.chunks >= 3
    assert len(bodies) >= result.chunks + 1
    for body in bodies:
        assert len(str(body["prompt"])) // 4 < 2048
        assert "French" in str(body["prompt"])
    assert "Part 1:" in str(bodies[-1]["prompt"])
    assert result.completion_tokens >= sum(1 for _ in bodies)
