"""avocado-infer through the real queue: the official ``ollama`` client and the ``openai`` SDK
against the gateway, an in-process worker on the Ollama simulator behind it; what a client
reads is the job's stored result, with its counts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import ollama
import openai
import pytest
import redis
from amqp.exceptions import NotFound

from avocado_shared import Producer, Settings
from avocado_shared.fleet import WorkerRecord, WorkerRegistry
from avocado_shared.routing import Lane, lane_queue_name
from avocado_shared.streams import EntryKind, JobStream
from avocado_sim import OllamaSimulator
from tests.gateway import InProcessGateway
from tests.gateway_clients import JOB_ID_HEADER, Fleet, assert_counts
from tests.services import REDIS_URL, free_port

WAIT = 90
MODEL = "llama3.2:1b"
ASK = "Tell me about avocados."


def test_ollama_generate_streamed_is_the_stored_result(
    fleet: Fleet, fresh_sim: OllamaSimulator, settings: Settings
) -> None:
    fresh_sim.config.tokens_per_s = 100  # paced: the worker writes the tokens one by one
    try:
        answer = fleet.ollama().generate(
            model=MODEL, prompt=ASK, stream=True, options={"num_predict": 20}
        )
        chunks = list(answer)
    finally:
        fresh_sim.config.tokens_per_s = None

    *pieces, final = chunks
    assert all(c.done is False and c.model == MODEL and c.created_at for c in pieces)
    assert final.response == ""
    text = "".join(c.response or "" for c in pieces)
    result = fleet.last_result()
    assert text == result.text
    assert_counts(final, result)
    # A chunk for each text entry of the job's stream, as the worker wrote them.
    with redis.Redis.from_url(REDIS_URL) as client:
        stream = JobStream(client, settings.key_prefix, fleet.job_ids[0])
        written = [e.text for e in stream.entries(timeout_s=WAIT) if e.kind is EntryKind.TEXT]
    assert [c.response for c in pieces] == written
    assert len(written) > 1


def test_ollama_generate_not_streamed_is_the_stored_result(fleet: Fleet) -> None:
    answer = fleet.ollama().generate(model=MODEL, prompt=ASK, stream=False)

    result = fleet.last_result()
    assert answer.response == result.text
    assert_counts(answer, result)


def test_ollama_chat_streamed_is_the_stored_result(fleet: Fleet) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}]
    chunks = list(fleet.ollama().chat(model=MODEL, messages=messages, stream=True))

    *pieces, final = chunks
    assert pieces
    assert all(c.message.role == "assistant" and c.done is False for c in pieces)
    text = "".join(c.message.content or "" for c in pieces)
    result = fleet.last_result()
    assert text == result.text
    assert final.message.content == ""
    assert_counts(final, result)


def test_ollama_chat_not_streamed_is_the_stored_result(fleet: Fleet) -> None:
    answer = fleet.ollama().chat(model=MODEL, messages=[{"role": "user", "content": ASK}])

    result = fleet.last_result()
    assert answer.message.role == "assistant"
    assert answer.message.content == result.text
    assert_counts(answer, result)


@pytest.fixture
def served(settings: Settings) -> Iterator[str]:
    """A worker's record in the fleet registry, as a running worker keeps it; its model."""
    registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), settings.key_prefix)
    record = WorkerRecord(worker="infer-test@node", models=["qwen3:0.6b"])
    registry.put(record)
    yield record.models[0]
    registry.remove(record.worker)
    registry.close()


def test_models_are_those_live_workers_serve(
    gateway_factory: Callable[..., InProcessGateway], producer: Producer, served: str
) -> None:
    fleet = Fleet(gateway_factory(), producer)

    registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), producer.settings.key_prefix)
    # Each by its server's own name (``smollm2-135m-instruct``, not ``...:latest``), as listed.
    live = sorted({r.names.get(m, m) for r in registry.live() for m in r.models})
    registry.close()
    listed = fleet.ollama().list()
    assert served in live
    assert sorted(m.model or "" for m in listed.models) == live
    models = fleet.openai().models.list()
    assert sorted(m.id for m in models.data) == live
    assert all(m.object == "model" for m in models.data)


def test_a_model_no_live_node_serves_is_a_404_and_nothing_is_queued(
    gateway_factory: Callable[..., InProcessGateway], producer: Producer, served: str
) -> None:
    fleet = Fleet(gateway_factory(), producer)
    with pytest.raises(ollama.ResponseError) as refused:
        fleet.ollama().generate(model="nope:1b", prompt=ASK)
    assert refused.value.status_code == 404
    assert "model 'nope:1b' not found: no live node serves it" in refused.value.error
    assert served in refused.value.error  # what the fleet does serve
    with pytest.raises(openai.NotFoundError) as missing:
        fleet.openai().chat.completions.create(
            model="nope:1b", messages=[{"role": "user", "content": ASK}]
        )
    assert missing.value.code == "model_not_found"
    with producer.app.connection_for_write() as connection, pytest.raises(NotFound):
        connection.default_channel.queue_declare(
            lane_queue_name("nope:1b", Lane.INTERACTIVE), passive=True
        )


def test_openai_chat_not_streamed_is_the_stored_result(fleet: Fleet) -> None:
    completion = fleet.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": ASK}]
    )

    assert completion.object == "chat.completion"
    result = fleet.result(completion.id.removeprefix("chatcmpl-"))
    [choice] = completion.choices
    assert choice.message.content == result.text
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == result.prompt_tokens
    assert completion.usage.completion_tokens == result.completion_tokens
    assert completion.usage.total_tokens == result.prompt_tokens + result.completion_tokens


def test_openai_chat_streamed_ends_with_its_usage(fleet: Fleet) -> None:
    stream = fleet.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    *answer, last = chunks
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert answer[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in answer][-1] == "stop"
    assert all(c.usage is None for c in answer)
    text = "".join(c.choices[0].delta.content or "" for c in answer)
    result = fleet.result(last.id.removeprefix("chatcmpl-"))
    assert text == result.text
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == result.completion_tokens
    assert last.usage.prompt_tokens == result.prompt_tokens


def test_openai_completions_streamed_and_not(fleet: Fleet) -> None:
    client = fleet.openai()
    completion = client.completions.create(model=MODEL, prompt=ASK)
    chunks = list(client.completions.create(model=MODEL, prompt=ASK, stream=True))

    assert completion.object == "text_completion"
    result = fleet.result(completion.id.removeprefix("cmpl-"))
    assert completion.choices[0].text == result.text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == result.completion_tokens
    streamed = fleet.result(chunks[0].id.removeprefix("cmpl-"))
    assert "".join(c.choices[0].text for c in chunks) == streamed.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is None  # not asked for


def test_a_job_its_server_refused_is_a_400_in_each_apis_shape(
    fleet: Fleet, fresh_sim: OllamaSimulator
) -> None:
    fresh_sim.config.fail_status = 400  # permanent: the job fails at once, for good
    fresh_sim.config.fail_first = 2
    try:
        with pytest.raises(ollama.ResponseError) as raised:
            list(fleet.ollama().generate(model=MODEL, prompt=ASK, stream=True))
        with pytest.raises(openai.APIStatusError) as refused:
            fleet.openai().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": ASK}]
            )
    finally:
        fresh_sim.config.fail_first = 0
        fresh_sim.config.fail_status = 503

    # The client's request is at fault, not the fleet: a 400, not a 502 to retry.
    assert raised.value.status_code == 400
    assert "failed: OllamaRejected: ollama refused the request: " in raised.value.error
    assert refused.value.status_code == 400
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert fresh_sim.generation_calls == 2  # the SDK did not retry: one job each
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    assert "refused the request" in body["message"]


def test_health_version_and_readiness(fleet: Fleet) -> None:
    with httpx.Client(base_url=fleet.gateway.url, timeout=WAIT) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/api/version").json() == {"version": "0.1.0"}


def test_without_broker_and_redis_not_ready_and_a_503_in_each_apis_shape(
    gateway_factory: Callable[..., InProcessGateway], settings: Settings
) -> None:
    nowhere = Settings(
        broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        key_prefix=settings.key_prefix,
    )
    gateway = gateway_factory(fleet=nowhere, ready_timeout_s=1)

    with httpx.Client(base_url=gateway.url, timeout=WAIT) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        tags = client.get("/api/tags")
        models = client.get("/v1/models")
        generate = client.post("/api/generate", json={"model": MODEL, "prompt": ASK})
        chat = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": ASK}]},
        )

    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert set(ready.json()) == {"status", "broker", "redis"}
    for answer in (tags, generate):
        assert answer.status_code == 503, answer.text
        assert list(answer.json()) == ["error"]
    for answer in (models, chat):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["type"] == "server_error"
    # Redis, which says which models live nodes serve, is asked first: nothing is published.
    assert "the fleet registry is not readable" in generate.json()["error"]


def test_a_body_sent_as_a_form_is_read_as_json(fleet: Fleet) -> None:
    """As Ollama reads it: ``curl -d`` (its documentation's examples) sends a form's type."""
    body = json.dumps({"model": MODEL, "prompt": ASK, "stream": False})
    form = {"content-type": "application/x-www-form-urlencoded"}
    with httpx.Client(base_url=fleet.gateway.url, timeout=WAIT) as client:
        answer = client.post("/api/generate", content=body, headers=form)

    assert answer.status_code == 200, answer.text
    result = fleet.result(answer.headers[JOB_ID_HEADER])
    assert answer.json()["response"] == result.text


def test_an_answer_cut_mid_stream_is_continued_not_repeated(
    fleet: Fleet, fresh_sim: OllamaSimulator
) -> None:
    """The inference server drops the connection after the first token: the job retries and
    continues the streamed text, and the client reads it whole, nothing twice."""
    fresh_sim.config.tokens_per_s = 100
    fresh_sim.config.drop_first = 1
    try:
        answer = fleet.ollama().chat(
            model=MODEL, messages=[{"role": "user", "content": ASK}], stream=True
        )
        *pieces, final = list(answer)
    finally:
        fresh_sim.config.tokens_per_s = None
        fresh_sim.config.drop_first = 0

    assert fresh_sim.generation_calls == 2  # cut, then continued
    result = fleet.last_result()
    assert "".join(c.message.content or "" for c in pieces) == result.text
    assert final.eval_count == result.completion_tokens
