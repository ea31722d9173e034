"""OpenAI's Responses API: ``POST /v1/responses`` as a fleet job (the same durable jobs and
answer path as chat), answered with a Response object or streamed as its typed events.

Input is a string or message items (with ``function_call`` and ``function_call_output`` items
for tools), ``instructions`` the system turn. Responses are not stored: what needs a stored
response (``previous_response_id``, ``conversation``, ``background``) is refused with a 400,
and the answer says ``"store": false``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from avocado_infer.answer import SSE_EVENTS, Framing, answer
from avocado_infer.deps import ADMITTED, GatewayDep
from avocado_infer.errors import documented_errors, error_route, http_status
from avocado_infer.openai_api import OpenAIError, ResponseFormat, openai_error
from avocado_infer.reading import Ending
from avocado_shared.contracts import InvalidRequest, ToolCall, Usage
from avocado_shared.errors import AvocadoError

__all__ = ["router"]

router = APIRouter(
    prefix="/v1", route_class=error_route(openai_error), responses=documented_errors(OpenAIError)
)


class _Lenient(BaseModel):
    """Fields of OpenAI's this fleet does not use are ignored, as in chat."""

    model_config = ConfigDict(extra="ignore")


class InputPart(_Lenient):
    type: str
    text: str | None = None


class InputItem(_Lenient):
    """A message (``type`` message or none), a ``function_call`` the model made, or a
    ``function_call_output`` answering one."""

    type: str = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        if any(p.type not in ("input_text", "output_text", "text") for p in self.content):
            raise InvalidRequest("input: only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class FunctionTool(_Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Lenient):
    type: Literal["function"]
    name: str


class TextFormat(ResponseFormat):
    """``text.format``: chat's ``response_format`` with the schema beside its name."""

    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    def job_format(self) -> str | dict[str, Any] | None:
        if self.type == "json_schema":
            if self.schema_ is None:
                raise InvalidRequest("text.format.schema: an object is required")
            return self.schema_
        return super().job_format()


class TextConfig(_Lenient):
    format: TextFormat | None = None


class ResponsesBody(_Lenient):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    # Refused in words: they need responses stored, which the fleet does not keep.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None

    def job(self) -> dict[str, Any]:
        """The fleet job's fields."""
        for name in ("previous_response_id", "conversation", "background"):
            if getattr(self, name):
                raise InvalidRequest(
                    f"{name} is not supported: responses are not stored; send the whole "
                    "conversation as input"
                )
        options = {
            "num_predict": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        job: dict[str, Any] = {
            "messages": _messages(self.input),
            "system": self.instructions,
            "model": self.model,
            "options": {k: v for k, v in options.items() if v is not None},
            "format": self.text.format.job_format() if self.text and self.text.format else None,
        }
        if self.tools:
            job["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunction):
            job["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            job["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            job["parallel_tool_calls"] = self.parallel_tool_calls
        return job


def _messages(given: str | list[InputItem]) -> list[dict[str, Any]]:
    """The input as a chat: messages in turn, function calls as an assistant's tool calls
    (consecutive ones in one turn), their outputs as tool turns."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages: list[dict[str, Any]] = []
    for item in given:
        if item.type == "message" and item.role is not None:
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item.text()})
        elif item.type == "function_call" and item.call_id and item.name:
            call = {
                "id": item.call_id,
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output" and item.call_id:
            messages.append(
                {"role": "tool", "content": item.output or "", "tool_call_id": item.call_id}
            )
        else:
            raise InvalidRequest(
                f"input: an item of type {item.type!r} is not supported (messages with a role, "
                "function_call with call_id and name, function_call_output with call_id)"
            )
    if not messages:
        raise InvalidRequest("input: at least one item is required")
    return messages


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class _Shapes:
    """The Response object of one job's answer, and its stream of typed events (each with
    its ``sequence_number``); text first (output 0), then one item per tool call."""

    framing: Framing = SSE_EVENTS

    def __init__(self, job_id: str, body: ResponsesBody) -> None:
        self.job_id = job_id
        self.body = body
        self.created_at = int(time.time())
        self.message_id = f"msg_{job_id}"
        self._sequence = 0
        self._parts: list[str] = []
        self._started = False
        # Where the text is: the message's one part, output 0.
        self._where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def _response(
        self, status: str, output: list[dict[str, Any]], end: Ending | None
    ) -> dict[str, Any]:
        body = self.body
        choice = body.tool_choice
        incomplete = status == "incomplete"
        return {
            "id": f"resp_{self.job_id}",
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if end is not None else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": end.usage.model if end is not None else body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": choice.model_dump()
            if isinstance(choice, NamedFunction)
            else choice or "auto",
            "tools": [t.model_dump() for t in body.tools or []],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": False,
            "metadata": body.metadata or {},
            "usage": _usage(end.usage) if end is not None else None,
        }

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self._text_part(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _call(self, index: int, call: ToolCall, status: str) -> dict[str, Any]:
        return {
            "id": f"fc_{self.job_id}_{index}",
            "type": "function_call",
            "call_id": call.id,
            "name": call.function.name,
            "arguments": call.function.arguments if status == "completed" else "",
            "status": status,
        }

    def _output(self, text: str, end: Ending) -> list[dict[str, Any]]:
        output = [self._message(text, "completed")] if text or not end.tool_calls else []
        return output + [self._call(i, c, "completed") for i, c in enumerate(end.tool_calls)]

    @staticmethod
    def _status(end: Ending) -> str:
        return "incomplete" if end.usage.done_reason == "length" else "completed"

    def whole(self, text: str, end: Ending) -> dict[str, Any]:
        return self._response(self._status(end), self._output(text, end), end)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _opening(self) -> list[dict[str, Any]]:
        if self._started:
            return []
        self._started = True
        begun = self._response("in_progress", [], None)
        return [
            self._event("response.created", response=begun),
            self._event("response.in_progress", response=begun),
        ]

    def _text_opening(self) -> list[dict[str, Any]]:
        where = self._where
        return [
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self._message("", "in_progress"),
            ),
            self._event("response.content_part.added", part=self._text_part(""), **where),
        ]

    def piece(self, text: str) -> list[dict[str, Any]]:
        events = self._opening()
        if not self._parts:
            events += self._text_opening()
        self._parts.append(text)
        where = self._where
        return [
            *events,
            self._event("response.output_text.delta", delta=text, logprobs=[], **where),
        ]

    def last(self, end: Ending) -> Iterable[dict[str, Any]]:
        yield from self._opening()
        text = "".join(self._parts)
        where = self._where
        if text or not end.tool_calls:
            if not self._parts:
                yield from self._text_opening()
            yield self._event("response.output_text.done", text=text, logprobs=[], **where)
            yield self._event("response.content_part.done", part=self._text_part(text), **where)
            item = self._message(text, "completed")
            yield self._event("response.output_item.done", output_index=0, item=item)
        first = 1 if text or not end.tool_calls else 0
        for index, call in enumerate(end.tool_calls):
            at = {"output_index": first + index}
            yield self._event(
                "response.output_item.added", item=self._call(index, call, "in_progress"), **at
            )
            call_at = {"item_id": f"fc_{self.job_id}_{index}", **at}
            arguments = call.function.arguments
            yield self._event("response.function_call_arguments.delta", delta=arguments, **call_at)
            yield self._event(
                "response.function_call_arguments.done", arguments=arguments, **call_at
            )
            yield self._event(
                "response.output_item.done", item=self._call(index, call, "completed"), **at
            )
        status = self._status(end)
        done = self._response(status, self._output(text, end), end)
        yield self._event(f"response.{status}", response=done)

    def failed(self, error: AvocadoError) -> dict[str, Any]:
        status = http_status(error)
        code = "server_error" if status >= 500 else "invalid_request_error"
        return self._event("error", code=code, message=str(error), param=None)


_ANSWER = SSE_EVENTS.documented(
    "A Response object; streamed, its events (response.created, response.output_text.delta, "
    "response.function_call_arguments.delta, response.completed, ...) as named server-sent "
    "events."
)


@router.post("/responses", dependencies=ADMITTED, responses=_ANSWER)
async def responses(body: ResponsesBody, gateway: GatewayDep, request: Request) -> Response:
    return await answer(
        request, gateway, body.job(), lambda job_id: _Shapes(job_id, body), streamed=body.stream
    )
