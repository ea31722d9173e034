"""The worker's side of tool calls, pure: OpenAI's streamed deltas put together, Ollama's calls
read, a history's calls linked to their results for either API, and a ``tool_choice`` that
forces a call held to it."""

from __future__ import annotations

import pytest

from avocado_shared.contracts import (
    ChatMessage,
    GenerateRequest,
    InvalidRequest,
    Usage,
    validate_request,
)
from ollama_worker.inference import Completion
from ollama_worker.tool_calls import (
    DeltaCalls,
    ToolChoiceIgnored,
    honoured,
    linked_messages,
    ollama_calls,
    ollama_message,
    openai_message,
)
from tests.tools import WEATHER


def test_openai_deltas_make_whole_calls_by_index() -> None:
    calls = DeltaCalls()
    calls.add([{"index": 0, "id": "call_a", "function": {"name": "weather", "arguments": ""}}])
    calls.add([{"index": 1, "id": "call_b", "function": {"name": "time", "arguments": "{}"}}])
    calls.add([{"index": 0, "function": {"arguments": '{"city"'}}])
    calls.add([{"index": 0, "function": {"arguments": ': "Lima"}'}}])

    assert [(c.id, c.function.name, c.function.arguments) for c in calls.calls()] == [
        ("call_a", "weather", '{"city": "Lima"}'),
        ("call_b", "time", "{}"),
    ]


def test_ollamas_calls_get_ids_and_json_arguments() -> None:
    [call] = ollama_calls([{"function": {"name": "weather", "arguments": {"city": "Lima"}}}])

    assert call.id is not None
    assert call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("weather", '{"city": "Lima"}')


def test_a_history_from_either_api_is_linked_for_either_server() -> None:
    history = [
        ChatMessage(role="user", content="Lima?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Lima"}}}],
            }
        ),
        ChatMessage(role="tool", content="sunny", tool_name="weather"),
    ]

    linked = linked_messages(history)

    assert linked[1]["tool_calls"][0]["id"] == "call_1_0"
    assert (linked[2]["tool_call_id"], linked[2]["tool_name"]) == ("call_1_0", "weather")
    assert openai_message(linked[1])["content"] == ""
    assert "tool_name" not in openai_message(linked[2])
    assert ollama_message(linked[1])["tool_calls"] == [
        {"function": {"name": "weather", "arguments": {"city": "Lima"}}}
    ]
    assert "tool_call_id" not in ollama_message(linked[2])


def test_a_history_call_whose_arguments_are_no_object_breaks_the_contract() -> None:
    broken = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}
    broken["tool_calls"][0]["function"]["arguments"] = "[1]"
    with pytest.raises(InvalidRequest, match="arguments of the call to 'f' must be a JSON object"):
        validate_request(GenerateRequest, {"messages": [broken]})


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "weather"}}]
)
def test_a_forced_call_answered_in_text_fails(choice: object) -> None:
    job = GenerateRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "Lima?"}],
            "tools": [WEATHER],
            "tool_choice": choice,
        }
    )
    prose = Completion("It is sunny.", Usage(model="m"))
    with pytest.raises(ToolChoiceIgnored, match="does not honour tool_choice"):
        honoured(job, prose)
    auto = job.model_copy(update={"tool_choice": "auto"})
    assert honoured(auto, prose) is prose
