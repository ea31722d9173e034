"""Jobs on a real model through RabbitMQ: SmolLM2-135M-Instruct (the embedded default) on
llama-cpp-python's OpenAI-compatible server, the way start-ml-services.sh runs it without
Ollama; from Python and through the gateway with the ``ollama`` client, the ``openai`` SDK and
LangChain. Greedy decoding (temperature 0, a seed) makes its answers repeatable. The same server
embeds with all-MiniLM-L6-v2 (``all-minilm``): sentences that mean the same come out closer."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest
import redis
from langchain_core.messages import AIMessage
from langchain_ollama import OllamaEmbeddings
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessageParam

from avocado_shared import GenerateResult, JobStatus, Producer, Settings
from avocado_shared.contracts import EmbedResult
from avocado_shared.fleet import ModelMeta, WorkerRegistry
from avocado_shared.routing import canonical_model
from avocado_shared.streams import EntryKind, JobStream
from ollama_worker.embedded import EMBED_MODEL, MODEL
from ollama_worker.openai_backend import OpenAIClient
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.gateway_clients import Fleet, assert_counts
from tests.inprocess import InProcessWorker
from tests.services import REDIS_URL, VENV_BIN, WorkerProcess, free_port, stop_group, wait_for
from tests.tools import WEATHER

WAIT = 180
CONTEXT = 1024
GREEDY = {"temperature": 0, "seed": 7}
LONG = 160  # tokens of the answer a worker is killed in the middle of


@pytest.fixture(scope="module")
def model_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded model's server of this module; its /v1 URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("embedded") / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            # One thread: on the suite's busy CPU, llama.cpp's threads would spin against it
            # (measured: the same prompts at half the CPU, and faster).
            [
                str(VENV_BIN / "avocado-embedded-llm"),
                *("--port", str(port), "--n-ctx", str(CONTEXT), "--threads", "1"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/v1"

    def serves() -> bool:
        assert server.poll() is None, log.read_text(errors="replace")
        try:
            return httpx.get(f"{url}/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(serves, timeout=120, what="the embedded model's server")
        yield url
    finally:
        stop_group(server)


def _worker(
    factory: WorkerFactory, url: str, concurrency: int = 1, *, process: bool = False, **env: str
) -> WorkerProcess | InProcessWorker:
    """A worker on the real model; ``process``: a subprocess, for a test that kills it."""
    start = factory.process if process else factory
    settings = {
        "AVOCADO_BACKEND": "openai",
        "AVOCADO_BACKEND_URL": url,
        "AVOCADO_DEFAULT_MODEL": MODEL,
        "AVOCADO_SUMMARY_NUM_CTX": str(CONTEXT),
        # As start-ml-services.sh sets them: this server cannot continue a partial answer,
        # and takes a schema inside json_object.
        "AVOCADO_STREAM_RESUME": "restart",
        "AVOCADO_BACKEND_SERVER": "llama-cpp-python",
    }
    # No Ollama: the worker must not need one.
    return start(f"http://127.0.0.1:{free_port()}", concurrency=concurrency, **settings | env)


def _direct(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, object]:
    """The same request straight to the server, not streamed: what it reports."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **GREEDY}
    answer: dict[str, object] = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
    return answer


def test_prompt_chat_and_json_jobs_on_the_real_model(
    producer: Producer, worker_factory: WorkerFactory, model_url: str
) -> None:
    _worker(worker_factory, model_url)
    options = {"num_predict": 32, **GREEDY}

    prompt = producer.generate("Why is the sky blue?", model=MODEL, options=options).get(
        timeout=WAIT
    )
    messages = [
        {"role": "system", "content": "You are a helpful gardener."},
        {"role": "user", "content": "Name one vegetable that grows in spring."},
    ]
    chat = producer.generate(messages=messages, model=MODEL, options=options).get(timeout=WAIT)
    data = producer.generate(
        "Give a JSON object with the keys name and color for a ripe tomato.",
        model=MODEL,
        format="json",
        options={"num_predict": 48, **GREEDY},
    ).get(timeout=WAIT)

    assert prompt.model == chat.model == MODEL
    assert prompt.total_duration_ms > 0  # the worker's own clock: this server reports none
    direct = _direct(model_url, [{"role": "user", "content": "Why is the sky blue?"}], 32)
    assert prompt.text == direct["choices"][0]["message"]["content"]  # type: ignore[index]
    assert prompt.completion_tokens == direct["usage"]["completion_tokens"]  # type: ignore[index]
    said = _direct(model_url, messages, 32)
    assert chat.text == said["choices"][0]["message"]["content"]  # type: ignore[index]
    assert chat.completion_tokens == said["usage"]["completion_tokens"]  # type: ignore[index]
    assert isinstance(json.loads(data.text), dict)


def test_jobs_sent_to_the_server_at_once_each_get_their_whole_answer_first_time(
    producer: Producer, worker_factory: WorkerFactory, model_url: str
) -> None:
    # llama-cpp-python's server cuts the stream it is generating when another request
    # arrives, unless told not to; a worker of concurrency 2 sends two at once.
    _worker(worker_factory, model_url, concurrency=2)
    prompts = ["Why is the sky blue?", "Name one vegetable that grows in spring."]

    options = {"num_predict": 32, **GREEDY}
    handles = [producer.generate(p, model=MODEL, options=options) for p in prompts]
    results = [h.get(timeout=WAIT) for h in handles]

    # Not compared with a later answer of the server's: it reuses its prompt cache across
    # requests, and greedy decoding from a cached prefix may pick other tokens.
    for result in results:
        assert result.done_reason in ("stop", "length"), "the server ended the answer itself"
        assert 3 < result.completion_tokens <= 32, "a cut stream stops after a few tokens"
        assert result.text.strip()
        row = producer.results.get(result.job_id)
        assert row is not None
        assert row.attempts == 1, "no answer was cut short and tried again"


def test_a_summary_longer_than_the_context_is_chunked(
    producer: Producer, worker_factory: WorkerFactory, model_url: str
) -> None:
    _worker(worker_factory, model_url)
    paragraph = (
        "Tomatoes need six hours of sun, deep watering twice a week and a stake to climb. "
        "Pinch the side shoots so the plant puts its strength into the fruit. "
    )
    text = "\n\n".join(paragraph * 6 for _ in range(7))  # about 1.5 times the context

    summary = producer.summarize(
        f"garden-{uuid.uuid4().hex[:6]}", text, options={"max_words": 30, "model": MODEL}
    ).get(timeout=WAIT)

    assert summary.chunks > 1
    assert summary.summary.strip()
    assert summary.model == MODEL
    # The parts were sized by the model's own tokenizer, the one the server counts with.
    with OpenAIClient(model_url) as client:
        counted = client.count_tokens(MODEL, text)
    root = model_url.removesuffix("/v1")
    tokens = httpx.post(f"{root}/extras/tokenize", json={"input": text}, timeout=60).json()
    assert counted == len(tokens["tokens"])


def test_a_worker_killed_mid_generation_leaves_the_job_to_another(
    producer: Producer, worker_factory: WorkerFactory, model_url: str, key_prefix: str
) -> None:
    # The shortest lease: the job it dies holding is redelivered that much later.
    doomed = _worker(worker_factory, model_url, process=True, AVOCADO_JOB_LEASE_S="3")
    assert isinstance(doomed, WorkerProcess)
    # LONG tokens: seconds of answer still to come after the first, when the kill lands.
    handle = producer.generate(
        "Write a long story about a garden.", model=MODEL, options={"num_predict": LONG, **GREEDY}
    )
    stream = JobStream(redis.Redis.from_url(REDIS_URL), key_prefix, handle.id)
    first = next(stream.entries(timeout_s=WAIT))  # the answer has begun

    doomed.kill()
    assert not handle.ready()
    _worker(worker_factory, model_url)

    result = handle.get(timeout=WAIT)

    assert result.text.strip()
    # Started over, not continued: the stream says so, and its text is the result.
    entries = list(stream.entries(after=first.id, timeout_s=WAIT))
    assert EntryKind.RESTART in [e.kind for e in entries]
    assert stream.text(timeout_s=WAIT) == result.text
    assert 0 < result.completion_tokens <= LONG
    row = producer.results.get(handle.id)
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.attempts == 2


@pytest.fixture
def fleet(
    producer: Producer,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    settings: Settings,
    model_url: str,
) -> Fleet:
    """The gateway on a fleet whose default model is the embedded one, a worker serving it."""
    _worker(worker_factory, model_url)
    gateway = gateway_factory(fleet=settings.model_copy(update={"default_model": MODEL}))
    return Fleet(gateway, producer, WAIT)


def _finish_reason(result: GenerateResult) -> str:
    return "length" if result.done_reason == "length" else "stop"


def test_the_ollama_client_through_the_gateway_on_the_real_model(fleet: Fleet) -> None:
    client = fleet.ollama()
    options = {"num_predict": 16, **GREEDY}
    messages = [{"role": "user", "content": "Name one vegetable that grows in spring."}]

    whole = client.generate(model=MODEL, prompt="Why is the sky blue?", options=options)
    *pieces, final = client.generate(
        model=MODEL, prompt="Why is the sky blue?", options=options, stream=True
    )
    said = client.chat(model=MODEL, messages=messages, options=options)
    *parts, last = client.chat(model=MODEL, messages=messages, options=options, stream=True)
    listed = client.list()

    whole_result, streamed, said_result, chatted = (fleet.result(j) for j in fleet.job_ids)
    assert whole.response == whole_result.text
    assert_counts(whole, whole_result)
    assert "".join(p.response or "" for p in pieces) == streamed.text
    assert_counts(final, streamed)
    assert said.message.content == said_result.text
    assert_counts(said, said_result)
    assert "".join(p.message.content or "" for p in parts) == chatted.text
    assert_counts(last, chatted)
    for result in (whole_result, streamed, said_result, chatted):
        assert result.text.strip()
        assert result.model == MODEL
        assert result.done_reason in ("stop", "length")
        # Counted by the worker: this server streams no usage, so the prompt's count is
        # unknown (0) and the completion's is its chunks, a token each.
        assert 0 < result.completion_tokens <= 16
    assert len(pieces) > 1  # streamed a piece at a time, as the model wrote them
    assert MODEL in [m.model for m in listed.models]


def test_the_openai_sdk_through_the_gateway_on_the_real_model(fleet: Fleet) -> None:
    client = fleet.openai()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Name one vegetable that grows in spring."}
    ]
    sampling: dict[str, Any] = {"max_tokens": 16, "temperature": 0, "seed": 7}

    completion = client.chat.completions.create(model=MODEL, messages=messages, **sampling)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **sampling,
        )
    )
    text = client.completions.create(model=MODEL, prompt="Why is the sky blue?", **sampling)
    models = client.models.list()

    said = fleet.result(completion.id.removeprefix("chatcmpl-"))
    assert completion.choices[0].message.content == said.text
    assert completion.choices[0].finish_reason == _finish_reason(said)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == said.completion_tokens
    *answer, usage = chunks
    streamed = fleet.result(usage.id.removeprefix("chatcmpl-"))
    assert "".join(c.choices[0].delta.content or "" for c in answer) == streamed.text
    assert answer[-1].choices[0].finish_reason == _finish_reason(streamed)
    assert usage.usage is not None
    assert usage.usage.completion_tokens == streamed.completion_tokens
    completed = fleet.result(text.id.removeprefix("cmpl-"))
    assert text.choices[0].text == completed.text
    assert text.choices[0].finish_reason == _finish_reason(completed)
    for result in (said, streamed, completed):
        assert result.text.strip()
        assert 0 < result.completion_tokens <= 16
    assert MODEL in [m.id for m in models.data]


def test_show_and_models_retrieve_on_the_real_model(fleet: Fleet, settings: Settings) -> None:
    """llama-cpp-python's server says nothing of a model but its name: no context, no tools."""
    shown = fleet.ollama().show(MODEL)
    retrieved = fleet.openai().models.retrieve(MODEL)
    registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), settings.key_prefix)
    model = canonical_model(MODEL)
    # This test's worker, and those of the module's earlier tests while their records last.
    said = [record.meta.get(model) for record in registry.live() if model in record.models]
    registry.close()

    # It was asked (the record keys the model by its canonical name).
    assert said
    assert said == [ModelMeta(capabilities=["completion"])] * len(said)
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo == {}
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == (MODEL, "model", "avocado")


def test_tools_and_responses_through_the_gateway_on_the_real_model(fleet: Fleet) -> None:
    """SmolLM2's chat template shows the model no tools: llama-cpp-python's server makes a
    call only for a ``tool_choice`` that names the function (a grammar from its schema),
    answers ``auto`` in prose, as it would straight, and ignores ``required``, which the
    fleet then fails with a reason that says so."""
    client = fleet.openai()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Lima?"}
    ]
    named: dict[str, Any] = {"type": "function", "function": {"name": "weather"}}
    sampling: dict[str, Any] = {"max_tokens": 24, "temperature": 0, "seed": 7}

    called = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        tool_choice=named,
        **sampling,  # type: ignore[list-item]
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice=named,
            stream=True,
            **sampling,
        )
    )
    prose = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],  # type: ignore[list-item]
        **sampling,
    )
    [made] = called.choices[0].message.tool_calls or []
    history: list[Any] = [
        *messages,
        called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": made.id, "content": "Sunny, 24 C"},
    ]
    answered = client.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=[WEATHER],  # type: ignore[list-item]
        **sampling,
    )
    with pytest.raises(openai.APIStatusError, match="does not honour tool_choice"):
        client.with_options(max_retries=0).chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER],
            tool_choice="required",
            **sampling,  # type: ignore[list-item]
        )
    chain = ChatOpenAI(
        model=MODEL,
        base_url=f"{fleet.gateway.url}/v1",
        api_key="none",  # type: ignore[arg-type]
        temperature=0,
        timeout=fleet.wait,
    ).bind_tools([WEATHER], tool_choice="weather")
    chained = chain.invoke("What is the weather in Lima?")
    asked: dict[str, Any] = {"input": "Name one vegetable.", "max_output_tokens": 16}
    response = client.responses.create(model=MODEL, temperature=0, **asked)
    events = list(client.responses.create(model=MODEL, temperature=0, stream=True, **asked))

    assert called.choices[0].finish_reason == "tool_calls"
    [call] = called.choices[0].message.tool_calls or []
    assert call.function.name == "weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    [stored] = fleet.result(called.id.removeprefix("chatcmpl-")).tool_calls
    assert (stored.id, stored.function.arguments) == (call.id, call.function.arguments)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    streamed = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(streamed) == json.loads(call.function.arguments)  # greedy: the same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert prose.choices[0].message.content
    said = fleet.result(answered.id.removeprefix("chatcmpl-"))
    assert answered.choices[0].message.content == said.text != ""
    assert not prose.choices[0].message.tool_calls
    assert response.output_text == fleet.result(response.id.removeprefix("resp_")).text != ""
    assert isinstance(chained, AIMessage)
    assert [c["name"] for c in chained.tool_calls] == ["weather"]
    ended = events[-1]
    assert ended.type == f"response.{response.status}"  # completed, or cut: incomplete
    assert ended.response.output_text == response.output_text  # greedy: the same answer


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_json_schema_output_through_both_apis_on_the_real_model(fleet: Fleet) -> None:
    """The schema goes to llama-cpp-python's server in the one form it takes (json_object with
    the schema inside); its grammar makes even a 135M model follow it."""
    ask = "Give a person as JSON."
    said = fleet.ollama().chat(
        model=MODEL,
        messages=[{"role": "user", "content": ask}],
        format=PERSON,
        options={"num_predict": 64, **GREEDY},
    )
    completion = fleet.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ask}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        max_tokens=64,
        temperature=0,
        seed=7,
    )

    for text in (said.message.content, completion.choices[0].message.content):
        assert text is not None
        jsonschema.validate(json.loads(text), PERSON)
    assert completion.choices[0].finish_reason == "stop"


def test_a_request_the_server_refuses_fails_at_once_in_the_fleets_words(
    producer: Producer,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    settings: Settings,
    model_url: str,
) -> None:
    """A worker not told which server it talks to sends OpenAI's json_schema, which
    llama-cpp-python's server answers with a 500 holding a validation error, its file paths
    and its stack: the job fails on its first attempt and the client reads a 400 in the
    fleet's words."""
    _worker(worker_factory, model_url, AVOCADO_BACKEND_SERVER="standard")
    gateway = gateway_factory(fleet=settings.model_copy(update={"default_model": MODEL}))
    fleet = Fleet(gateway, producer, WAIT)
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as refused:
        fleet.openai().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Give a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            max_tokens=8,
        )
    waited = time.monotonic() - started

    body = refused.value.body
    assert isinstance(body, dict)
    message = str(body["message"])
    print(f"the client's error after {waited:.2f}s: {refused.value.status_code} {message}")
    assert message.endswith(
        "openai-compatible server refused the request: response_format.type: Input should be "
        "'text' or 'json_object'"
    )
    assert "File" not in message
    assert "site-packages" not in message
    job_id = message.removeprefix("job ").split(" ", 1)[0]
    # The gateway answered from the stream's end; Celery's failure hook writes the row next.
    row = wait_for(
        lambda: (now := producer.results.get(job_id)) and now.status is JobStatus.FAILURE and now,
        timeout=WAIT,
        what="the failure row",
    )
    assert row.attempts == 1, "failed on its first attempt, not retried"


def test_images_to_a_model_that_cannot_see_are_refused_in_its_servers_words(
    fleet: Fleet,
) -> None:
    picture = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(32)).decode()
    with pytest.raises(ollama.ResponseError) as refused:
        fleet.ollama().chat(
            model=MODEL,
            messages=[{"role": "user", "content": "What is this?", "images": [picture]}],
            options={"num_predict": 8},
        )

    print(f"the client's error: {refused.value.status_code} {refused.value.error}")
    assert refused.value.status_code == 400
    assert refused.value.error.endswith(
        "openai-compatible server refused the request: it ended the answer before it began, "
        "without a reason (its own log has it); the request shows images: can its model see?"
    )


# Two pairs that mean the same, in other words, and sentences about something else.
SAME = [
    ("A man is playing a guitar.", "Someone plays the guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
]
OTHER = ["The stock market fell sharply today.", "Rain is expected in the north tonight."]


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def test_embeddings_on_the_real_model_are_closer_for_sentences_that_mean_the_same(
    producer: Producer, worker_factory: WorkerFactory, model_url: str
) -> None:
    _worker(worker_factory, model_url)
    texts = [t for pair in SAME for t in pair] + OTHER

    result = producer.embed(texts, model=EMBED_MODEL).get(timeout=WAIT)

    assert isinstance(result, EmbedResult)
    vectors = dict(zip(texts, result.embeddings, strict=True))
    assert {len(v) for v in vectors.values()} == {384}
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-6) for v in vectors.values())
    assert result.prompt_tokens > len(texts)  # counted by the model's tokenizer
    for a, b in SAME:
        same = _cosine(vectors[a], vectors[b])
        others = {o: _cosine(vectors[a], vectors[o]) for o in OTHER}
        print(f"cosine {a!r} ~ {b!r}: {same:.3f}; ~ others: {others}")  # the figures
        assert all(same > other for other in others.values()), (same, others)


def test_the_clients_embed_through_the_gateway_on_the_real_model(
    fleet: Fleet, model_url: str
) -> None:
    texts = list(SAME[0])
    straight = httpx.post(
        f"{model_url}/embeddings", json={"model": EMBED_MODEL, "input": texts}, timeout=WAIT
    ).json()
    # The server gives them unscaled; the fleet gives every vector length 1, as Ollama does.
    expected = [[x / math.hypot(*d["embedding"]) for x in d["embedding"]] for d in straight["data"]]

    ollama_said = fleet.ollama().embed(model=EMBED_MODEL, input=texts)
    openai_said = fleet.openai().embeddings.create(model=EMBED_MODEL, input=texts)
    langchain_said = OllamaEmbeddings(model=EMBED_MODEL, base_url=fleet.gateway.url)

    for got, want in zip(ollama_said.embeddings, expected, strict=True):
        assert list(got) == pytest.approx(want, abs=1e-6)
    for item, want in zip(openai_said.data, expected, strict=True):
        assert item.embedding == pytest.approx(want, abs=1e-6)
    assert openai_said.usage.prompt_tokens == straight["usage"]["prompt_tokens"]
    for got, want in zip(langchain_said.embed_documents(texts), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_a_batch_through_the_gateway_on_the_real_model(fleet: Fleet) -> None:
    """The SDK's batch flow on SmolLM2 and MiniLM: each line's answer is the one the same
    request gets asked alone (greedy decoding)."""
    client = fleet.openai()
    chat = {"model": MODEL, "max_tokens": 12, **GREEDY}
    questions = ["Name a fruit.", "Name a colour."]
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions"}
        | {"body": chat | {"messages": [{"role": "user", "content": question}]}}
        for i, question in enumerate(questions)
    ]
    texts = [
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings"}
        | {"body": {"model": EMBED_MODEL, "input": questions}}
    ]
    ended = {}
    for endpoint, requests in (("/v1/chat/completions", lines), ("/v1/embeddings", texts)):
        raw = b"".join(json.dumps(line).encode() + b"\n" for line in requests)
        uploaded = client.files.create(file=("in.jsonl", raw), purpose="batch")
        made = client.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )
        ended[endpoint] = wait_for(
            lambda made=made: (b := client.batches.retrieve(made.id)).status == "completed" and b,
            timeout=WAIT,
            what=f"the {endpoint} batch",
        )

    answers = {}
    for batch in ended.values():
        assert batch.output_file_id is not None
        assert batch.error_file_id is None
        for raw in client.files.content(batch.output_file_id).text.splitlines():
            record = json.loads(raw)
            answers[record["custom_id"]] = record["response"]["body"]
    for i, question in enumerate(questions):
        alone = client.chat.completions.create(
            messages=[{"role": "user", "content": question}], **chat
        )
        got = openai.types.chat.ChatCompletion.model_validate(answers[f"c{i}"])
        print(f"batch line c{i}: {question!r} -> {got.choices[0].message.content!r}")  # issue 26
        assert got.choices[0].message.content == alone.choices[0].message.content
    vectors = openai.types.CreateEmbeddingResponse.model_validate(answers["e"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]
