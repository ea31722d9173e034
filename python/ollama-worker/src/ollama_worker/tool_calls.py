"""Tool calls between a job and its server: the history's calls linked to their results, each
message in the form its API takes, and the calls read back from a streamed answer (OpenAI's
deltas, pieces of one call by ``index``; Ollama's whole calls in a chunk)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from avocado_shared.contracts import ChatMessage, FunctionCall, GenerateRequest, ToolCall
from ollama_worker.inference import BackendRejected, Completion

__all__ = [
    "DeltaCalls",
    "ToolChoiceIgnored",
    "ToolRequest",
    "honoured",
    "linked_messages",
    "new_call_id",
    "ollama_calls",
    "ollama_message",
    "openai_message",
    "tool_request",
]

ToolRequest = dict[str, Any]
"""What a job asks of the server's tools: ``tools``, ``tool_choice``, ``parallel_tool_calls``,
each only when the job set it."""


def tool_request(job: GenerateRequest) -> ToolRequest:
    """The job's tools, as OpenAI's and Ollama's APIs take them, for ``Backend.chat``."""
    if not job.tools:
        return {}
    fields: ToolRequest = {"tools": [t.model_dump(exclude_none=True) for t in job.tools]}
    if job.tool_choice is not None:
        choice = job.tool_choice
        fields["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
    if job.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = job.parallel_tool_calls
    return fields


class ToolChoiceIgnored(BackendRejected):
    """The server answered without the tool call ``tool_choice`` demanded: it took the tools
    and did not use them (a chat template that shows the model no tools)."""


def honoured(job: GenerateRequest, done: Completion) -> Completion:
    """``done``, once it is sure to keep a ``tool_choice`` that forces a call: an answer
    without one fails the job, rather than reach the client as if it were the call."""
    choice = job.tool_choice
    if choice is None or choice in ("auto", "none") or done.tool_calls:
        return done
    wanted = choice if isinstance(choice, str) else f"the function {choice.function.name!r}"
    raise ToolChoiceIgnored(
        f"the inference server answered in text although tool_choice asked for {wanted}: it "
        "does not honour tool_choice for this model (its chat template may not support tools)"
    )


def new_call_id() -> str:
    """An id for a call its server gave none (Ollama's): the tool's result names it."""
    return f"call_{uuid.uuid4().hex[:24]}"


def linked_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as dicts, each call with an id and each tool result with both links (the
    id OpenAI's servers need, the name Ollama's does), so a history from either API suits
    either server. A result that names neither answers the oldest call not yet answered."""
    linked: list[dict[str, Any]] = []
    open_calls: list[ToolCall] = []
    for index, message in enumerate(messages):
        data = message.model_dump(exclude_none=True)
        if message.tool_calls:
            calls = [
                c if c.id else c.model_copy(update={"id": f"call_{index}_{n}"})
                for n, c in enumerate(message.tool_calls)
            ]
            data["tool_calls"] = [c.model_dump(exclude_none=True) for c in calls]
            open_calls = list(calls)
        elif message.role == "tool":
            answered = _answered(open_calls, message)
            if answered is not None:
                open_calls.remove(answered)
                data.setdefault("tool_call_id", answered.id)
                data.setdefault("tool_name", answered.function.name)
        linked.append(data)
    return linked


def _answered(calls: list[ToolCall], result: ChatMessage) -> ToolCall | None:
    for call in calls:
        if result.tool_call_id is not None:
            if call.id == result.tool_call_id:
                return call
        elif result.tool_name is None or call.function.name == result.tool_name:
            return call
    return None


def openai_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A linked message as OpenAI's chat takes it: no ``tool_name``. An assistant turn that
    only called tools keeps its empty content, not OpenAI's null: llama-cpp-python's server
    refuses a null (a 500)."""
    return {k: v for k, v in message.items() if k != "tool_name"}


def ollama_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A linked message as Ollama's ``/api/chat`` takes it: a call's arguments an object (the
    contract holds them to one), a result linked by ``tool_name``."""
    data = {k: v for k, v in message.items() if k != "tool_call_id"}
    if "tool_calls" in data:
        data["tool_calls"] = [
            {
                "function": {
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"]["arguments"]),
                }
            }
            for c in data["tool_calls"]
        ]
    return data


def ollama_calls(calls: Iterable[Any]) -> list[ToolCall]:
    """Ollama's calls of one chunk (``message.tool_calls``), an id given to each without."""
    read = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        read.append(
            ToolCall(
                id=call.get("id") or new_call_id(),
                function=FunctionCall(
                    name=str(function.get("name", "")), arguments=function.get("arguments") or {}
                ),
            )
        )
    return read


class DeltaCalls:
    """OpenAI's streamed calls put together: the first delta of a call (by ``index``) brings
    its id and name, the next ones pieces of its arguments."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Iterable[Any]) -> None:
        """The ``tool_calls`` of one chunk's delta."""
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            call = self._calls.setdefault(
                int(delta.get("index") or 0), {"id": "", "name": "", "arguments": ""}
            )
            function = delta.get("function") or {}
            call["id"] = call["id"] or str(delta.get("id") or "")
            call["name"] = call["name"] or str(function.get("name") or "")
            call["arguments"] += str(function.get("arguments") or "")

    def calls(self) -> list[ToolCall]:
        """The calls, in their order."""
        return [
            ToolCall(
                id=call["id"] or new_call_id(),
                function=FunctionCall(name=call["name"], arguments=call["arguments"] or "{}"),
            )
            for _index, call in sorted(self._calls.items())
        ]
