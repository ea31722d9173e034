"""The OpenAI-compatible client against the simulator's /v1 side: answers parsed, usage taken
from the server, summaries chunked by its context, failures mapped to their kind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from avocado_shared.contracts import SummarizeOptions
from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.errors import JobTimedOut, PermanentError, TransientError
from ollama_worker.inference import DeadlinePassed, ModelNotFound
from ollama_worker.ollama import OllamaClient
from ollama_worker.openai_backend import OpenAIClient, OpenAIRejected, OpenAIUnavailable
from ollama_worker.retry import RetryPolicy
from ollama_worker.settings import WorkerSettings
from ollama_worker.summary import summarize_text
from tests.services import free_port

MODEL = "llama3.2:1b"
CHAT = "/v1/chat/completions"


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=[MODEL], context_length=1024)) as server:
        yield server


@pytest.fixture
def client(sim: OllamaSimulator) -> Iterator[OpenAIClient]:
    with OpenAIClient(f"{sim.url}/v1", read_timeout=5) as made:
        yield made


def _reported_usage(sim: OllamaSimulator, body: dict[str, Any]) -> dict[str, Any]:
    """The ``usage`` event the server sends for ``body`` (the simulator is deterministic)."""
    events = []
    with httpx.stream("POST", f"{sim.url}{CHAT}", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return next(e["usage"] for e in events if e.get("usage"))


def test_a_prompt_is_one_user_message_after_the_system_and_usage_is_the_servers(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    done = client.generate(MODEL, "Say something", system="Be brief", options={"num_predict": 9})

    sent = sim.requests.last(CHAT).body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Say something"},
    ]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    usage = _reported_usage(sim, sent)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert done.usage.completion_tokens == 9
    assert len(done.text.split()) == 9
    assert done.usage.done_reason == "length"
    assert done.usage.model == MODEL
    # llama.cpp-style timings carry the durations.
    assert done.usage.total_duration_ms >= done.usage.eval_duration_ms > 0


def test_chat_maps_ollama_options_and_drops_what_only_ollama_knows(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    done = client.chat(
        MODEL,
        [{"role": "user", "content": "Hello"}],
        options={"num_predict": 5, "temperature": 0.2, "seed": 3, "num_ctx": 8192},
        keep_alive="5m",
    )

    sent = sim.requests.last(CHAT).body
    assert sent["max_tokens"] == 5
    assert (sent["temperature"], sent["seed"]) == (0.2, 3)
    assert "num_ctx" not in sent
    assert "keep_alive" not in sent
    assert "options" not in sent
    assert done.usage.completion_tokens == 5
    assert done.text.strip()


def test_json_output_parses(sim: OllamaSimulator, client: OpenAIClient) -> None:
    done = client.generate(MODEL, "Answer in JSON", format="json")

    assert sim.requests.last(CHAT).body["response_format"] == {"type": "json_object"}
    assert isinstance(json.loads(done.text), dict)


def test_a_json_schema_becomes_response_format_json_schema(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
    }

    done = client.chat(MODEL, [{"role": "user", "content": "A city"}], format=schema)

    fmt = sim.requests.last(CHAT).body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == schema
    answer = json.loads(done.text)
    assert isinstance(answer["city"], str)
    assert isinstance(answer["rank"], int)


def test_models_are_listed_and_a_missing_one_cannot_be_pulled(client: OpenAIClient) -> None:
    assert client.models() == [MODEL]
    assert client.has_model(MODEL)
    assert not client.has_model("llama3.2")
    assert not client.can_pull

    with pytest.raises(ModelNotFound, match=r"not served .* cannot be pulled") as caught:
        client.pull("phi3:mini")
    assert MODEL in str(caught.value), "the message says what the server does serve"


def test_the_context_comes_from_max_model_len_or_llama_cpp_props(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    assert client.context_length(MODEL) == 1024

    sim.config.openai_context_in = "props"
    sim.config.context_length = 2048
    assert "max_model_len" not in httpx.get(f"{sim.url}/v1/models").json()["data"][0]
    assert client.context_length(MODEL) == 2048


def test_the_summary_context_falls_back_to_the_configured_one(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    sim.config.openai_context_in = None

    assert client.context_length(MODEL) is None
    assert client.summary_context(MODEL, 4096) == 4096
    with OllamaClient(sim.url) as ollama_client:
        assert ollama_client.summary_context(MODEL, 3000) == 3000, "Ollama takes num_ctx"


def test_a_summary_is_chunked_by_the_servers_context(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    paragraph = " ".join(f"word{i}" for i in range(60)) + "."
    text = "\n\n".join(paragraph for _ in range(40))  # ~2400 words, over a 1024-token context
    options = SummarizeOptions(max_words=40)

    with pytest.raises(OpenAIRejected, match="maximum context length is 1024"):
        summarize_text(client, MODEL, text, options, num_ctx=8192)  # trusting a wrong context

    sim.clear()
    done, chunks = summarize_text(
        client, MODEL, text, options, num_ctx=client.summary_context(MODEL, 8192)
    )

    calls = sim.requests.to(CHAT)
    assert chunks > 1
    assert len(calls) > chunks, "each part, then the combining; none refused as too long"
    assert all(call.body["max_tokens"] == options.max_words * 2 for call in calls)
    assert done.usage.prompt_tokens == sum(
        _reported_usage(sim, call.body)["prompt_tokens"] for call in calls
    ), "the summary's cost is the sum of what the server reported"
    assert done.text.strip()


def test_a_summary_is_chunked_by_the_servers_own_token_counts(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    # Two characters a token (the simulator counts words), denser than the 4 estimated.
    text = "\n\n".join(" ".join(["a"] * 60) + "." for _ in range(40))
    options = SummarizeOptions(max_words=40)

    done, chunks = summarize_text(client, MODEL, text, options, num_ctx=1024)

    assert sim.requests.to("/tokenize"), "the server's tokenizer was asked"
    assert chunks > 1
    assert done.text.strip(), "no part was refused as longer than the context"
    guessing = OpenAIClient(f"{sim.url}/v1")
    guessing.count_tokens = lambda model, text: None  # type: ignore[method-assign]
    with pytest.raises(OpenAIRejected, match="maximum context length is 1024"):
        summarize_text(guessing, MODEL, text, options, num_ctx=1024)  # the estimate alone


def test_token_counts_come_from_whichever_tokenizer_endpoint_the_server_has(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    assert client.count_tokens(MODEL, "one two three") == 3  # llama.cpp's /tokenize
    sim.config.openai_context_in = "models"
    assert client.count_tokens(MODEL, "one two three four") == 4  # vLLM's
    with OllamaClient(sim.url) as ollama:
        assert ollama.count_tokens(MODEL, "one two") is None  # Ollama's API has none


def test_429_is_transient_and_its_retry_after_sets_the_retry_delay(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    sim.config.fail_status = 429
    sim.config.fail_first = 1
    sim.config.retry_after_s = 7

    with pytest.raises(OpenAIUnavailable, match="429") as caught:
        client.generate(MODEL, "hi")

    assert isinstance(caught.value, TransientError)
    assert caught.value.retry_after == 7
    policy = RetryPolicy(max_retries=5, backoff_max_s=60)
    assert all(policy.countdown(0, caught.value.retry_after) >= 7 for _ in range(20))
    assert client.generate(MODEL, "hi").text, "the next call goes through"


@pytest.mark.parametrize(
    ("status", "kind", "error", "said"),
    [
        (500, TransientError, OpenAIUnavailable, "answered 500"),
        (502, TransientError, OpenAIUnavailable, "answered 502"),
        (503, TransientError, OpenAIUnavailable, "answered 503"),
        (504, TransientError, OpenAIUnavailable, "answered 504"),
        (400, PermanentError, OpenAIRejected, r"^openai-compatible server refused the request: "),
        (422, PermanentError, OpenAIRejected, r"^openai-compatible server refused the request: "),
    ],
)
def test_server_errors_are_transient_and_rejections_permanent(
    sim: OllamaSimulator,
    client: OpenAIClient,
    status: int,
    kind: type,
    error: type,
    said: str,
) -> None:
    sim.config.fail_status = status
    sim.config.fail_first = 1

    with pytest.raises(error, match=said) as caught:
        client.chat(MODEL, [{"role": "user", "content": "hi"}])

    assert isinstance(caught.value, kind)
    assert client.chat(MODEL, [{"role": "user", "content": "hi"}]).text, "one call failed"


def test_an_unknown_model_is_permanent_and_says_it_cannot_be_pulled(
    client: OpenAIClient,
) -> None:
    with pytest.raises(ModelNotFound, match=r"not served .* cannot be pulled") as caught:
        client.generate("missing:1b", "hi")

    assert isinstance(caught.value, PermanentError)
    assert "does not exist" in str(caught.value), "the server's own words are kept"


def test_a_stream_dropped_midway_is_transient(sim: OllamaSimulator, client: OpenAIClient) -> None:
    sim.config.drop_first = 1

    with pytest.raises(OpenAIUnavailable) as caught:
        client.generate(MODEL, "hi")

    assert isinstance(caught.value, TransientError)
    assert client.generate(MODEL, "hi").text, "only one stream was cut"


def test_a_stream_ended_without_a_finish_reason_is_cut_short_and_transient(
    sim: OllamaSimulator, client: OpenAIClient
) -> None:
    sim.config.interrupt_first = 1

    with pytest.raises(OpenAIUnavailable, match="without a finish_reason") as caught:
        client.generate(MODEL, "hi")

    assert isinstance(caught.value, TransientError)
    assert client.generate(MODEL, "hi").usage.done_reason, "the next answer ends with its reason"


def test_connection_refused_is_transient() -> None:
    with (
        OpenAIClient(f"http://127.0.0.1:{free_port()}/v1") as client,
        pytest.raises(OpenAIUnavailable),
    ):
        client.models()


def test_the_job_deadline_holds_for_this_backend_too(sim: OllamaSimulator) -> None:
    sim.config.tokens_per_s = 20  # each token well within the read timeout
    with OpenAIClient(f"{sim.url}/v1", read_timeout=5) as client:
        with client.deadline(0.3), pytest.raises(DeadlinePassed) as caught:
            client.generate(MODEL, "hi", options={"num_predict": 200})
        assert isinstance(caught.value, JobTimedOut)


def test_the_api_key_is_a_bearer_token_and_stays_out_of_errors(sim: OllamaSimulator) -> None:
    key = "sk-test-secret-value"
    with OpenAIClient(f"{sim.url}/v1", api_key=SecretStr(key)) as client:
        client.models()
        assert sim.requests.last("/v1/models").headers["Authorization"] == f"Bearer {key}"

        sim.config.fail_status = 503
        sim.config.fail_first = 1
        with pytest.raises(OpenAIUnavailable) as caught:
            client.generate(MODEL, "hi")
    assert key not in str(caught.value)
    assert key not in repr(caught.value)


def test_the_settings_pick_the_backend_and_refuse_a_half_configured_one() -> None:
    chosen = WorkerSettings(
        backend="openai", backend_url="http://gpu:8000/v1", backend_api_key="sk-abc-secret"
    )
    assert "sk-abc-secret" not in repr(chosen)
    assert WorkerSettings().backend == "ollama"
    with pytest.raises(ValidationError, match="needs AVOCADO_BACKEND_URL"):
        WorkerSettings(backend="openai")
    with pytest.raises(ValidationError, match="is for AVOCADO_BACKEND=openai"):
        WorkerSettings(backend_url="http://gpu:8000/v1")
