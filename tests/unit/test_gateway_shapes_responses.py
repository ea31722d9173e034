"""OpenAI's Responses API on a fake gateway (``tests/fake_gateway.py``): the Response object
and the typed events of a streamed one, checked with the ``openai`` SDK's own models; input
items, instructions and tools published as the job's chat; what needs stored responses refused
with a 400."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from avocado_shared.contracts import FunctionCall, ToolCall, Usage
from tests.fake_gateway import MODEL, USAGE, Called, Failure, Served
from tests.tools import WEATHER as CHAT_WEATHER

Serve = Callable[..., Served]

PATH = "/v1/responses"
WEATHER = {"type": "function", **CHAT_WEATHER["function"], "strict": None}
CALL = ToolCall(id="call_7", function=FunctionCall(name="weather", arguments='{"city":"Lima"}'))
_EVENT = TypeAdapter(ResponseStreamEvent)


def named_events(body: bytes) -> list[Any]:
    """A stream's events, each checked against the SDK's model and its SSE name."""
    read = []
    for block in body.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        read.append(_EVENT.validate_python(event))
    assert [e.sequence_number for e in read] == list(range(len(read)))
    return read


def test_a_text_answer_is_a_response_object(served: Serve) -> None:
    app = served()
    app.fake.script("Hello, ", "world.", USAGE)
    answer = app.client.post(
        PATH, json={"model": MODEL, "input": "Hi", "instructions": "Be brief.", "temperature": 0}
    )
    assert answer.status_code == 200, answer.text
    response = Response.model_validate(answer.json())
    assert response.id == "resp_job-1"
    assert response.status == "completed"
    assert response.output_text == "Hello, world."
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 3)
    published = app.fake.published[0]
    assert published["messages"] == [{"role": "user", "content": "Hi"}]
    assert (published["system"], published["options"]) == ("Be brief.", {"temperature": 0})


def test_a_streamed_answer_is_its_typed_events(served: Serve) -> None:
    app = served()
    app.fake.script("Hello, ", "world.", USAGE)
    answer = app.client.post(PATH, json={"model": MODEL, "input": "Hi", "stream": True})
    assert answer.headers["content-type"].startswith("text/event-stream")
    read = named_events(answer.content)
    assert [e.type for e in read] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in read if e.type == "response.output_text.delta"]
    assert deltas == ["Hello, ", "world."]
    completed = read[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "Hello, world."


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_tool_calls_are_function_call_items(served: Serve, stream: bool) -> None:
    app = served()
    app.fake.script(Called(USAGE, (CALL,)))
    body = {
        "model": MODEL,
        "input": "Weather in Lima?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "weather"},
        "stream": stream,
    }
    answer = app.client.post(PATH, json=body)
    assert answer.status_code == 200, answer.text
    if stream:
        read = named_events(answer.content)
        arguments = [e.delta for e in read if e.type == "response.function_call_arguments.delta"]
        assert "".join(arguments) == CALL.function.arguments
        assert "response.output_text.delta" not in [e.type for e in read]
        last = read[-1]
        assert last.type == "response.completed"
        response = last.response
    else:
        response = Response.model_validate(answer.json())
    [item] = response.output
    assert item.type == "function_call"
    assert (item.call_id, item.name, item.arguments) == ("call_7", "weather", '{"city":"Lima"}')
    published = app.fake.published[0]
    assert published["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER[k] for k in ("name", "description", "parameters")},
        }
    ]
    assert published["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


def test_input_items_with_calls_and_outputs_are_the_jobs_chat(served: Serve) -> None:
    app = served()
    app.fake.script("Sunny.", USAGE)
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Lima?"}]},
        {"type": "function_call", "call_id": "call_7", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_7", "output": "sunny"},
    ]
    answer = app.client.post(PATH, json={"model": MODEL, "input": items, "tools": [WEATHER]})
    assert Response.model_validate(answer.json()).output_text == "Sunny."
    assert app.fake.published[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Lima?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_7", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_7"},
    ]


def test_an_answer_cut_at_max_output_tokens_is_incomplete(served: Serve) -> None:
    app = served()
    app.fake.script("Hello", Usage(model=MODEL, done_reason="length", completion_tokens=1))
    answer = app.client.post(PATH, json={"model": MODEL, "input": "Hi", "max_output_tokens": 1})
    response = Response.model_validate(answer.json())
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert app.fake.published[0]["options"] == {"num_predict": 1}


def test_a_failure_mid_stream_is_an_error_event(served: Serve) -> None:
    app = served()
    app.fake.script("Hello", Failure("the model crashed"))
    answer = app.client.post(PATH, json={"model": MODEL, "input": "Hi", "stream": True})
    last = named_events(answer.content)[-1]
    assert last.type == "error"
    assert "the model crashed" in last.message


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id is not supported"),
        ({"background": True}, "background is not supported"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "'reasoning' is not supported"),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "only text content parts",
        ),
    ],
    ids=["previous-response", "background", "reasoning-item", "web-search", "image"],
)
def test_what_needs_more_than_the_fleet_has_is_a_400(
    served: Serve, fields: dict[str, Any], says: str
) -> None:
    app = served()
    answer = app.client.post(PATH, json={"model": MODEL, "input": "Hi", **fields})
    assert answer.status_code == 400
    assert says in answer.json()["error"]["message"]
    assert app.fake.published == []


def test_the_sdks_stream_helper_reads_the_events(served: Serve) -> None:
    """``responses.stream`` puts the events together itself and checks their order."""
    app = served()
    app.fake.script("Let me see.", Called(USAGE, (CALL,)))
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=app.client)

    with sdk.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()

    assert texts == ["Let me see."]
    assert final.output_text == "Let me see."
    assert [(i.type, getattr(i, "arguments", None)) for i in final.output] == [
        ("message", None),
        ("function_call", CALL.function.arguments),
    ]


def test_text_format_is_the_jobs_format(served: Serve) -> None:
    app = served()
    app.fake.script("{}", USAGE)
    app.fake.script("{}", USAGE)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    formats = [{"type": "json_schema", "name": "person", "schema": schema}, {"type": "json_object"}]
    for format_ in formats:
        answer = app.client.post(
            PATH, json={"model": MODEL, "input": "Hi", "text": {"format": format_}}
        )
        assert answer.status_code == 200, answer.text
    assert [p["format"] for p in app.fake.published] == [schema, "json"]
