"""OpenAI's API: ``/v1/chat/completions`` and ``/v1/completions`` as fleet jobs, streamed as
server-sent events in OpenAI's chunk shape or answered in one JSON object; ``/v1/models`` and
``/v1/models/{id}``;
errors in OpenAI's shape."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from avocado_infer.answer import SSE, Framing, answer
from avocado_infer.bodies import NOT_BLANK, ToolCallBody
from avocado_infer.deps import ADMITTED, GatewayDep
from avocado_infer.errors import documented_errors, error_route, http_status
from avocado_infer.gateway import ServedModel
from avocado_infer.reading import Ending
from avocado_shared.contracts import GenerateResult, InvalidRequest, ToolCall, Usage
from avocado_shared.errors import AvocadoError

__all__ = ["ChatBody", "CompletionBody", "answer_body", "openai_error", "router"]


def _error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    # OpenAI's types: a rate limit is "requests", a bad key "invalid_request_error".
    kind = (
        "requests" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def openai_error(status: int, message: str, permanent: bool, code: str | None) -> Response:
    # The SDKs retry a 5xx unless told not to, in OpenAI's own header: a job that failed
    # for good would only be queued again.
    headers = {"x-should-retry": "false"} if permanent else None
    return JSONResponse(_error_body(status, message, code), status_code=status, headers=headers)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """OpenAI's error body, for the OpenAPI schema."""

    error: OpenAIErrorDetail


router = APIRouter(
    prefix="/v1", route_class=error_route(openai_error), responses=documented_errors(OpenAIError)
)


class _Lenient(BaseModel):
    """Fields of OpenAI's this fleet does not use are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Body(_Lenient):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(default=1, description="One choice: a job answers once.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def job_options(self, max_tokens: int | None = None) -> dict[str, Any]:
        """The sampling options, in Ollama's names, that the request sets."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        options = {
            "num_predict": max_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": stop,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return {k: v for k, v in options.items() if v is not None}

    def shapes(self, chat: bool) -> Callable[[str], _Shapes]:
        """The answer's objects, given its job's id."""
        include_usage = self.stream_options is not None and self.stream_options.include_usage
        return lambda job_id: _Shapes(chat, job_id, self.model, include_usage)


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = Field(
        default=None, description='{"url": "data:image/png;base64,..."}: a data URL only.'
    )

    def image(self) -> str:
        """The base64 image of an ``image_url`` part, from its data URL: a worker may have no
        internet, so an http(s) URL is refused rather than fetched."""
        given = self.image_url.get("url") if isinstance(self.image_url, dict) else self.image_url
        head, _, data = str(given or "").partition(",")
        if not (head.startswith("data:") and head.endswith(";base64") and data):
            raise InvalidRequest(
                "image_url: only data URLs are accepted (data:image/png;base64,...), "
                "since the fleet's nodes fetch nothing from the internet"
            )
        return data


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    def job_message(self) -> dict[str, Any]:
        """As a job's message: text parts joined, images (data URLs) as base64 ``images``;
        OpenAI's ``developer`` is a system turn; an assistant's tool calls and a tool result's
        link kept (the job contract checks them)."""
        content, images = self.content, []
        if isinstance(content, list):
            unknown = {p.type for p in content} - {"text", "image_url"}
            if unknown:
                raise InvalidRequest(
                    f"content parts of type {', '.join(sorted(unknown))} are not supported "
                    "(text and image_url are)"
                )
            images = [p.image() for p in content if p.type == "image_url"]
            content = "".join(p.text or "" for p in content if p.type == "text")
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls is not None:
            message["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message | {"images": images} if images else message


class FunctionTool(_Lenient):
    """A tool of OpenAI's chat: functions are the kind every backend takes."""

    type: Literal["function"]
    function: dict[str, Any]


ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    def job_format(self) -> str | dict[str, Any] | None:
        """Ollama's ``format``: "json", the schema, or none for text."""
        if self.type == "json_object":
            return "json"
        if self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest("response_format.json_schema.schema: an object is required")
            return schema
        return None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The deprecated forms of tools, refused in words rather than ignored.
    functions: list[Any] | None = Field(default=None, json_schema_extra={"deprecated": True})
    function_call: Any = Field(default=None, json_schema_extra={"deprecated": True})

    def job(self) -> dict[str, Any]:
        """The generation job's fields."""
        return {
            "messages": [m.job_message() for m in self.messages],
            "model": self.model,
            "options": self.job_options(self.max_completion_tokens),
            "format": self.response_format.job_format() if self.response_format else None,
            **self.job_tools(),
        }

    def job_tools(self) -> dict[str, Any]:
        """The job's tool fields that the request sets."""
        if self.functions is not None or self.function_call is not None:
            raise InvalidRequest(
                "functions and function_call are not supported: send tools and tool_choice"
            )
        tools = None if self.tools is None else [t.model_dump() for t in self.tools]
        fields = {
            "tools": tools,
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        return {k: v for k, v in fields.items() if v is not None}


Prompt = Annotated[str, Field(json_schema_extra=NOT_BLANK)]
OnePrompt = Annotated[
    list[Prompt], Field(min_length=1, max_length=1, description="One prompt: a job answers one.")
]


class CompletionBody(_Body):
    prompt: Prompt | OnePrompt

    def job(self) -> dict[str, Any]:
        """The generation job's fields."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return {"prompt": prompt, "model": self.model, "options": self.job_options()}


def _finish_reason(end: Ending) -> str:
    if end.tool_calls:
        return "tool_calls"
    return "length" if end.usage.done_reason == "length" else "stop"


def _calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape (a message's ``tool_calls``)."""
    return [call.model_dump() for call in calls]


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class _Shapes:
    """OpenAI's objects of one answer: chat (``message``/``delta``) or text completion
    (``text``)."""

    framing: Framing = SSE

    def __init__(self, chat: bool, job_id: str, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.id = f"chatcmpl-{job_id}" if chat else f"cmpl-{job_id}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._role_sent = False

    def _head(self, object_: str, model: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": model}

    def whole(self, text: str, end: Ending) -> dict[str, Any]:
        """The whole answer in one object."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if end.tool_calls:
                choice["message"] = {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": _calls(end.tool_calls),
                }
        else:
            choice["text"] = text
        choice["finish_reason"] = _finish_reason(end)
        usage = end.usage
        return self._head(self.object, usage.model) | {"choices": [choice], "usage": _usage(usage)}

    def _chunk(
        self, text: str | None, finish_reason: str | None, model: str, **delta_fields: Any
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            delta.update(delta_fields)
            if not self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent = True
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["finish_reason"] = finish_reason
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = self._head(object_, model) | {"choices": [choice]}
        return chunk | {"usage": None} if self.include_usage else chunk

    def piece(self, text: str) -> list[dict[str, Any]]:
        """A streamed piece of the text."""
        return [self._chunk(text, None, self.model)]

    def last(self, end: Ending) -> Iterable[dict[str, Any]]:
        """The tool calls as OpenAI streams them (a delta with a call's index, id and name,
        then one with its arguments), the chunk that says why the answer ended, then the
        usage chunk if asked for."""
        usage = end.usage
        for index, call in enumerate(end.tool_calls):
            head = {"index": index, "id": call.id, "type": "function"}
            named = head | {"function": {"name": call.function.name, "arguments": ""}}
            yield self._chunk(None, None, self.model, tool_calls=[named])
            arguments = {"index": index, "function": {"arguments": call.function.arguments}}
            yield self._chunk(None, None, self.model, tool_calls=[arguments])
        yield self._chunk(None, _finish_reason(end), usage.model)
        if self.include_usage:
            object_ = "chat.completion.chunk" if self.chat else "text_completion"
            yield self._head(object_, usage.model) | {"choices": [], "usage": _usage(usage)}

    def failed(self, error: AvocadoError) -> dict[str, Any]:
        return _error_body(http_status(error), str(error))


def answer_body(chat: bool, job_id: str, model: str, result: GenerateResult) -> dict[str, Any]:
    """A finished generation's answer, as a request not streamed gets it (a batch's line)."""
    end = Ending(result.usage(), tuple(result.tool_calls))
    return _Shapes(chat, job_id, model, include_usage=False).whole(result.text, end)


_ANSWER = SSE.documented(
    "Server-sent events ending in data: [DONE] when streamed, else one JSON object."
)


@router.post("/chat/completions", dependencies=ADMITTED, responses=_ANSWER)
async def chat_completions(body: ChatBody, gateway: GatewayDep, request: Request) -> Response:
    return await answer(request, gateway, body.job(), body.shapes(chat=True), streamed=body.stream)


@router.post("/completions", dependencies=ADMITTED, responses=_ANSWER)
async def completions(body: CompletionBody, gateway: GatewayDep, request: Request) -> Response:
    return await answer(request, gateway, body.job(), body.shapes(chat=False), streamed=body.stream)


def _model(m: ServedModel) -> dict[str, Any]:
    """OpenAI's Model object, with vLLM's ``max_model_len`` where a node's server gave the
    model's context; ``avocado`` says its nodes and its backlog per lane."""
    context = None if m.meta is None else m.meta.context_length
    return {
        "id": m.label,
        "object": "model",
        "created": int(m.seen_at.timestamp()),
        "owned_by": "avocado",
        **({"max_model_len": context} if context is not None else {}),
        "avocado": m.view(),
    }


@router.get("/models")
async def models(gateway: GatewayDep) -> dict[str, Any]:
    """The models live nodes serve (jobs for any other get a 404)."""
    return {"object": "list", "data": [_model(m) for m in await gateway.models()]}


@router.get("/models/{model:path}")
async def model(model: str, gateway: GatewayDep) -> dict[str, Any]:
    """One model live nodes serve; 404 ``model_not_found`` when none does."""
    return _model(await gateway.model(model))
