"""The simulator's OpenAI-compatible side, checked against the `openai` SDK's response models
(strict ``model_validate``, which the SDK itself skips) and driven by the SDK's own client, so
it cannot drift from the API real servers speak."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from avocado_sim import OllamaSimulator, SimConfig
from tests.tools import WEATHER

MODEL = "llama3.2:1b"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=[MODEL, "qwen2.5:0.5b"])) as server:
        yield server


@pytest.fixture
def http(sim: OllamaSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sim.url}/v1", timeout=10) as made:
        yield made


@pytest.fixture
def sdk(sim: OllamaSimulator) -> Iterator[openai.OpenAI]:
    # No retries: the SDK's own would hide the injected faults.
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-sim", max_retries=0) as made:
        yield made


def _events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """The ``data:`` payloads of one SSE answer, ``[DONE]`` kept as the string."""
    out: list[Any] = []
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert not line, f"only data events and blank lines: {line!r}"
    return out


def test_models_are_openai_models(http: httpx.Client) -> None:
    body = http.get("/models").json()

    assert body["object"] == "list"
    models = [Model.model_validate(entry) for entry in body["data"]]
    assert sorted(m.id for m in models) == sorted([MODEL, "qwen2.5:0.5b"])
    assert all(entry["max_model_len"] == 4096 for entry in body["data"])


def test_a_whole_chat_completion_is_a_chat_completion(http: httpx.Client) -> None:
    body = http.post("/chat/completions", json={"model": MODEL, "messages": HELLO}).json()

    done = ChatCompletion.model_validate(body)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_a_streamed_chat_is_chunks_then_usage_then_done(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6}
    whole = ChatCompletion.model_validate(http.post("/chat/completions", json=body).json())

    events = _events(
        http,
        "/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )

    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]), "only the last chunk carries usage"
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content


def test_without_include_usage_no_chunk_carries_usage(http: httpx.Client) -> None:
    events = _events(http, "/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True})

    assert all("usage" not in e for e in events[:-1])
    assert all(e["choices"] for e in events[:-1])


def test_text_completions_are_completions(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}
    whole = Completion.model_validate(http.post("/completions", json=body).json())
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 5

    events = _events(http, "/completions", {**body, "stream": True})

    assert events[-1] == "[DONE]"
    # Mid-stream chunks carry finish_reason null, as OpenAI's do; the SDK types it as set.
    chunks = [
        Completion.model_validate(
            {
                **e,
                "choices": [
                    {**c, "finish_reason": c["finish_reason"] or "stop"} for c in e["choices"]
                ],
            }
        )
        for e in events[:-1]
    ]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_json_object_output_is_valid_json(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}}

    done = ChatCompletion.model_validate(http.post("/chat/completions", json=body).json())

    assert isinstance(json.loads(done.choices[0].message.content or ""), dict)


def test_json_schema_output_follows_the_schema(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "tags"],
    }
    body = {
        "model": MODEL,
        "messages": HELLO,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }

    done = ChatCompletion.model_validate(http.post("/chat/completions", json=body).json())

    answer = json.loads(done.choices[0].message.content or "")
    assert isinstance(answer["name"], str)
    assert all(isinstance(tag, str) for tag in answer["tags"])


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["message"]
    return dict(body["error"])


def test_an_unknown_model_is_a_404_error_object(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json={"model": "nope:1b", "messages": HELLO})

    assert response.status_code == 404
    assert _error(response)["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL},
        {"model": MODEL, "messages": []},
        {"messages": HELLO},
        {"model": MODEL, "messages": HELLO, "max_tokens": 0},
        {"model": MODEL, "messages": HELLO, "response_format": {"type": "yaml"}},
    ],
)
def test_bad_requests_are_400_error_objects(http: httpx.Client, body: dict[str, Any]) -> None:
    response = http.post("/chat/completions", json=body)

    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"


def test_a_request_over_the_context_is_refused(sim: OllamaSimulator, http: httpx.Client) -> None:
    sim.config.context_length = 100
    long = [{"role": "user", "content": "word " * 90}]

    response = http.post(
        "/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 20}
    )

    assert response.status_code == 400
    assert _error(response)["code"] == "context_length_exceeded"


def test_injected_429_carries_retry_after(sim: OllamaSimulator, http: httpx.Client) -> None:
    sim.config.fail_status = 429
    sim.config.fail_first = 1
    sim.config.retry_after_s = 2

    response = http.post("/chat/completions", json={"model": MODEL, "messages": HELLO})

    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert _error(response)["type"] == "rate_limit_error"
    assert http.post("/chat/completions", json={"model": MODEL, "messages": HELLO}).is_success


def test_a_dropped_stream_ends_before_done(sim: OllamaSimulator, http: httpx.Client) -> None:
    sim.config.drop_first = 1
    lines: list[str] = []

    body = {"model": MODEL, "messages": HELLO, "stream": True}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/chat/completions", json=body) as response,
    ):
        lines.extend(line for line in response.iter_lines() if line)

    assert lines, "some tokens came before the cut"
    assert "[DONE]" not in "".join(lines)
    assert sim.config.drop_first == 0


def test_llama_cpp_props_report_the_context(sim: OllamaSimulator) -> None:
    assert httpx.get(f"{sim.url}/props").status_code == 404, "vLLM has no /props"

    sim.config.openai_context_in = "props"

    assert httpx.get(f"{sim.url}/props").json()["default_generation_settings"]["n_ctx"] == 4096
    assert "max_model_len" not in httpx.get(f"{sim.url}/v1/models").json()["data"][0]


def test_the_openai_sdk_streams_a_chat(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )

    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_the_openai_sdk_sees_its_own_error_classes(
    sim: OllamaSimulator, sdk: openai.OpenAI
) -> None:
    sim.config.fail_status = 429
    sim.config.fail_first = 1
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.chat.completions.create(model="nope:1b", messages=[{"role": "user", "content": "hi"}])
    assert sorted(m.id for m in sdk.models.list()) == sorted([MODEL, "qwen2.5:0.5b"])


def test_a_chat_with_tools_calls_one_whole_and_in_deltas(sdk: openai.OpenAI) -> None:
    asked: list[Any] = [{"role": "user", "content": "Weather in Lima?"}]
    whole = sdk.chat.completions.create(model=MODEL, messages=asked, tools=[WEATHER])
    chunks = list(
        sdk.chat.completions.create(model=MODEL, messages=asked, tools=[WEATHER], stream=True)
    )

    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert (deltas[0].id, deltas[0].function and deltas[0].function.name) == (call.id, "weather")
    pieces = [d.function.arguments for d in deltas[1:] if d.function]
    assert len(pieces) > 1  # the arguments in pieces, as OpenAI streams them
    assert "".join(p or "" for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tools_result_or_tool_choice_none_gets_text(sdk: openai.OpenAI) -> None:
    asked: list[Any] = [{"role": "user", "content": "Weather in Lima?"}]
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    answered: list[Any] = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    for messages, choice in ((answered, "auto"), (asked, "none")):
        reply = sdk.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], tool_choice=choice
        )
        assert reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.content


def test_a_tool_choice_naming_no_tool_is_a_400(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "clock"}},
    }
    answer = http.post("/chat/completions", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "tool_choice names no tool: 'clock'"
