"""Tool calls through the gateway's Ollama and OpenAI chat, on a fake gateway
(``tests/fake_gateway.py``): the tools and the history's calls and results published with the
job, the model's calls answered in each API's shape (streamed and whole, checked with the
clients' own models), and what the fleet cannot honour refused with a 400."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ollama
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from avocado_shared.contracts import FunctionCall, ToolCall
from tests.fake_gateway import MODEL, STREAMED, USAGE, Called, Served, events, ndjson
from tests.tools import WEATHER

Serve = Callable[..., Served]

CALL = ToolCall(id="call_7", function=FunctionCall(name="weather", arguments='{"city": "Lima"}'))
CALLED = Called(USAGE, (CALL,))
ASK = [{"role": "user", "content": "Weather in Lima?"}]
BROKEN_CALL = {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "[1"}}


@STREAMED
def test_ollama_chat_answers_the_models_tool_calls(served: Serve, stream: bool) -> None:
    app = served()
    app.fake.script("Let me look. ", CALLED)
    answer = app.client.post(
        "/api/chat", json={"model": MODEL, "messages": ASK, "tools": [WEATHER], "stream": stream}
    )
    assert answer.status_code == 200, answer.text
    chunks = ndjson(answer.content) if stream else [answer.json()]
    read = [ollama.ChatResponse.model_validate(chunk) for chunk in chunks]
    calls = [call for chunk in read for call in chunk.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("weather", {"city": "Lima"})
    ]
    assert "".join(chunk.message.content or "" for chunk in read) == "Let me look. "
    assert read[-1].done is True
    assert read[-1].done_reason == "stop"
    if stream:  # the calls in a chunk of their own before the counts, as Ollama streams
        assert chunks[-2]["message"]["tool_calls"][0]["id"] == "call_7"
        assert "tool_calls" not in chunks[-1]["message"]
    assert app.fake.published[0]["tools"] == [WEATHER]


def test_ollama_chat_publishes_the_historys_calls_and_results(served: Serve) -> None:
    app = served()
    app.fake.script("Sunny.", USAGE)
    # The call as the answer gave it (an id; the function's index), sent back as is.
    function = {"name": "weather", "arguments": {"city": "Lima"}}
    called = {"id": "call_7", "function": {"index": 0, **function}}
    result = {"role": "tool", "content": "sunny", "tool_name": "weather"}
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [called]}, result]
    client_body = {"model": MODEL, "messages": history, "tools": [WEATHER], "stream": False}
    answer = app.client.post("/api/chat", json=client_body)
    assert answer.json()["message"] == {"role": "assistant", "content": "Sunny."}
    kept = {"id": "call_7", "type": "function", "function": function}
    assert app.fake.published[0]["messages"] == [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [kept]},
        result,
    ]


def test_openai_chat_answers_tool_calls_whole(served: Serve) -> None:
    app = served()
    app.fake.script(CALLED)
    body = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    answer = app.client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    completion = ChatCompletion.model_validate(answer.json())
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    assert [c.model_dump() for c in choice.message.tool_calls] == [
        {
            "id": "call_7",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Lima"}'},
        }
    ]
    published = app.fake.published[0]
    assert published["tools"] == [WEATHER]
    assert (published["tool_choice"], published["parallel_tool_calls"]) == ("required", False)


def test_openai_chat_streams_tool_calls_as_deltas(served: Serve) -> None:
    app = served()
    app.fake.script(CALLED)
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "stream": True}
    answer = app.client.post("/v1/chat/completions", json=body)
    *chunks, done = events(answer.content)
    assert done == "[DONE]"
    read = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]
    deltas = [d for chunk in read for d in chunk.choices[0].delta.tool_calls or []]
    # The first delta of a call names it; the next ones bring its arguments.
    assert (deltas[0].index, deltas[0].id, deltas[0].type) == (0, "call_7", "function")
    assert deltas[0].function is not None
    assert deltas[0].function.name == "weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    joined = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert json.loads(joined) == {"city": "Lima"}
    assert read[0].choices[0].delta.role == "assistant"
    assert read[-1].choices[0].finish_reason == "tool_calls"


def test_openai_chat_publishes_the_historys_calls_and_results(served: Serve) -> None:
    app = served()
    app.fake.script("Sunny.", USAGE)
    call = CALL.model_dump()
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_7"},
    ]
    body = {"model": MODEL, "messages": history, "tools": [WEATHER], "tool_choice": "auto"}
    answer = app.client.post("/v1/chat/completions", json=body)
    assert answer.json()["choices"][0]["message"]["content"] == "Sunny."
    assert app.fake.published[0]["messages"] == [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_7"},
    ]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"functions": [WEATHER["function"]]}, "functions and function_call are not supported"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice names 'x', which is not among the tools",
        ),
        ({"tool_choice": "auto"}, "tool_choice and parallel_tool_calls need tools"),
        (
            {"messages": [*ASK, {"role": "assistant", "tool_calls": [BROKEN_CALL]}]},
            "the arguments of the call to 'weather' must be a JSON object",
        ),
    ],
    ids=["functions", "custom-tool", "unknown-choice", "choice-without-tools", "bad-arguments"],
)
def test_openai_chat_refuses_tools_it_cannot_honour(
    served: Serve, fields: dict[str, Any], says: str
) -> None:
    app = served()
    answer = app.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **fields}
    )
    assert answer.status_code == 400
    assert says in answer.json()["error"]["message"]
    assert app.fake.published == []
