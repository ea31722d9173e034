"""Tool calls and OpenAI's Responses API through the real queue: the official ``ollama`` client,
the ``openai`` SDK (chat with tools, streamed and not; ``responses.create``, streamed and not)
and LangChain's ``ChatOpenAI.bind_tools`` against the gateway, a worker on the simulator behind
it, on each backend (Ollama's API and the OpenAI-compatible one); what a client reads is the
job's stored result."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

from avocado_shared import Producer
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.gateway_clients import Fleet
from tests.tools import WEATHER

MODEL = "llama3.2:1b"
ASK = [{"role": "user", "content": "What is the weather in Lima?"}]
BACKENDS = ["ollama", "openai"]


@pytest.fixture(params=BACKENDS)
def fleet(
    request: pytest.FixtureRequest,
    sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    producer: Producer,
    gateway_factory: Callable[..., InProcessGateway],
) -> Fleet:
    """The gateway and a worker on the simulator through Ollama's API or its ``/v1``."""
    env = {"AVOCADO_BACKEND": "openai", "AVOCADO_BACKEND_URL": f"{sim.url}/v1"}
    worker_factory(sim.url, **(env if request.param == "openai" else {}))
    return Fleet(gateway_factory(), producer)


def _calls_of(result_calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in result_calls]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_the_ollama_client_calls_tools_and_reads_their_answer(fleet: Fleet, stream: bool) -> None:
    client = fleet.ollama()
    if stream:
        chunks = list(client.chat(model=MODEL, messages=ASK, tools=[WEATHER], stream=True))
    else:
        chunks = [client.chat(model=MODEL, messages=ASK, tools=[WEATHER])]
    calls = [call for chunk in chunks for call in chunk.message.tool_calls or []]
    read = [(c.function.name, dict(c.function.arguments)) for c in calls]
    assert [name for name, _ in read] == ["weather"]
    assert isinstance(read[0][1]["city"], str)
    assert read == _calls_of(fleet.last_result().tool_calls)

    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": "Sunny, 24 C", "tool_name": "weather"},
    ]
    answer = client.chat(model=MODEL, messages=history, tools=[WEATHER])
    assert answer.message.content
    assert not answer.message.tool_calls
    assert answer.message.content == fleet.result(fleet.job_ids[-1]).text


def test_the_openai_sdk_calls_tools_whole(fleet: Fleet) -> None:
    client = fleet.openai()
    completion = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    result = fleet.result(completion.id.removeprefix("chatcmpl-"))
    assert [(call.id, call.function.name, call.function.arguments)] == [
        (c.id, c.function.name, c.function.arguments) for c in result.tool_calls
    ]

    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    assert answer.choices[0].finish_reason == "stop"
    assert (
        answer.choices[0].message.content == fleet.result(answer.id.removeprefix("chatcmpl-")).text
    )


def test_the_openai_sdk_streams_tool_calls(fleet: Fleet) -> None:
    stream = fleet.openai().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="auto",
        stream=True,  # type: ignore[arg-type, list-item]
    )
    chunks = list(stream)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id
    assert deltas[0].function is not None
    assert deltas[0].function.name == "weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    [stored] = fleet.result(chunks[0].id.removeprefix("chatcmpl-")).tool_calls
    assert (deltas[0].id, arguments) == (stored.id, stored.function.arguments)


def test_a_tool_call_the_backend_cannot_force_is_a_clear_error(
    request: pytest.FixtureRequest, fleet: Fleet
) -> None:
    """``tool_choice=required`` reaches an OpenAI-compatible server as is; Ollama's API
    cannot force a call, so the job fails at once with a reason that says so."""
    client = fleet.openai()
    if request.node.callspec.params["fleet"] == "openai":
        completion = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",  # type: ignore[arg-type, list-item]
        )
        assert completion.choices[0].finish_reason == "tool_calls"
        return
    with pytest.raises(openai.APIStatusError, match="Ollama's API cannot force a tool call"):
        client.with_options(max_retries=0).chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",  # type: ignore[arg-type, list-item]
        )


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_responses_create_answers_text(fleet: Fleet, stream: bool) -> None:
    client = fleet.openai()
    asked = {"model": MODEL, "input": "Tell me of avocados.", "instructions": "Be brief."}
    if stream:
        events = list(client.responses.create(**asked, stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        completed = events[-1]
        assert completed.type == "response.completed"
        response = completed.response
        assert deltas == response.output_text
    else:
        response = client.responses.create(**asked)
    assert response.status == "completed"
    assert response.output_text == fleet.result(response.id.removeprefix("resp_")).text
    assert response.usage is not None
    assert response.usage.output_tokens > 0


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_responses_create_calls_tools(fleet: Fleet, stream: bool) -> None:
    client = fleet.openai()
    tool = {"type": "function", **WEATHER["function"]}
    asked = {"model": MODEL, "input": ASK[0]["content"], "tools": [tool]}
    if stream:
        events = list(client.responses.create(**asked, stream=True))  # type: ignore[arg-type]
        arguments = "".join(
            e.delta for e in events if e.type == "response.function_call_arguments.delta"
        )
        assert events[-1].type == "response.completed"
        response = events[-1].response
    else:
        response = client.responses.create(**asked)  # type: ignore[arg-type]
    [call] = response.output
    assert call.type == "function_call"
    if stream:
        assert arguments == call.arguments
    [stored] = fleet.result(response.id.removeprefix("resp_")).tool_calls
    assert (call.call_id, call.name, call.arguments) == (
        stored.id,
        stored.function.name,
        stored.function.arguments,
    )

    follow = [
        {"role": "user", "content": ASK[0]["content"]},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"},
    ]
    answer = client.responses.create(model=MODEL, input=follow, tools=[tool])  # type: ignore[arg-type, list-item]
    assert answer.output_text == fleet.result(answer.id.removeprefix("resp_")).text != ""


def test_langchain_bind_tools_calls_and_reads_the_result(fleet: Fleet) -> None:
    model = ChatOpenAI(
        model=MODEL,
        base_url=f"{fleet.gateway.url}/v1",
        api_key="none",
        timeout=fleet.wait,  # type: ignore[arg-type]
    )
    bound = model.bind_tools([WEATHER])
    asked = HumanMessage(ASK[0]["content"])
    called = bound.invoke([asked])
    assert isinstance(called, AIMessage)
    [call] = called.tool_calls
    assert call["name"] == "weather"
    assert isinstance(call["args"]["city"], str)

    result = ToolMessage("Sunny, 24 C", tool_call_id=call["id"])
    answer = bound.invoke([asked, called, result])
    assert isinstance(answer.content, str)
    assert answer.content
    assert not answer.tool_calls
