"""The simulator's OpenAI-compatible side: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` (SSE or whole), and llama.cpp's ``/props``.

Bodies follow OpenAI's API as vLLM and llama.cpp's server serve it (vLLM's ``max_model_len``,
llama.cpp's ``timings``, OpenAI's error object), with the same text, pacing and injected
faults as the Ollama side, so a client of either API meets the same simulated model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from itertools import count
from typing import TYPE_CHECKING, Any

from avocado_sim import _catalog as catalog
from avocado_sim._text import Reply, count_words, plan_chat, plan_reply, reply_key

if TYPE_CHECKING:
    from avocado_sim._http import _Handler

__all__ = ["ROUTES", "request_body"]

_JSON = "application/json"
_SSE = "text/event-stream"
_DONE = b"data: [DONE]\n\n"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_ids = count(1)
_ARGUMENT_PIECE = 8  # characters of a call's arguments per streamed delta
_INJECTED = {
    429: ("Rate limit reached for requests, please retry later", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request", None),
    502: ("Bad gateway", None),
    503: ("The server is overloaded or not ready yet", None),
    504: ("Gateway timeout", None),
    400: ("The request was invalid", None),
}


def _error(h: _Handler, status: int, message: str, code: str | None = None) -> None:
    """OpenAI's error object; a 429 or 503 carries the configured ``Retry-After``."""
    kind = (
        "rate_limit_error"
        if status == 429
        else "server_error"
        if status >= 500
        else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    h._send(status, _encode(body).encode(), _JSON, h._retry_after(status))


def _context(h: _Handler) -> int:
    return h.server.state.config.context_length


def models(h: _Handler, raw: bytes, started: int) -> None:
    """The served models; vLLM's ``max_model_len`` when the context is reported here."""
    state = h.server.state
    extra = {"max_model_len": _context(h)} if state.config.openai_context_in == "models" else {}
    data = [
        {"id": name, "object": "model", "created": int(modified), "owned_by": "library", **extra}
        for name, modified in state.pulled()
    ]
    h._send(200, _encode({"object": "list", "data": data}).encode(), _JSON)


def props(h: _Handler, raw: bytes, started: int) -> None:
    """llama.cpp's server properties, or the 404 of a server that has none (vLLM): its
    first model's (llama.cpp's server serves one) modalities and chat template's tool
    support among them."""
    config = h.server.state.config
    if config.openai_context_in != "props":
        h._send(404, b'{"detail":"Not Found"}', _JSON)
        return
    can = catalog.capabilities(config.models[0]) if config.models else []
    body = {
        "default_generation_settings": {"n_ctx": config.context_length},
        "modalities": {"vision": "vision" in can, "audio": False},
        "chat_template_caps": {"supports_tools": "tools" in can},
    }
    h._send(200, _encode({**body, "total_slots": config.parallel}).encode(), _JSON)


def tokenize(h: _Handler, raw: bytes, started: int) -> None:
    """``POST /tokenize``: llama.cpp's server (``content`` -> ``tokens``) or vLLM's
    (``prompt`` -> ``count``), by ``openai_context_in``; a word is a token here."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _error(h, 400, "We could not parse the JSON body of your request.")
    llama_cpp = h.server.state.config.openai_context_in == "props"
    text = body.get("content" if llama_cpp else "prompt") if isinstance(body, dict) else None
    if not isinstance(text, str):
        return _error(h, 400, "content must be a string" if llama_cpp else "prompt is required")
    tokens = list(range(count_words(text)))
    answer = {"tokens": tokens} if llama_cpp else {"count": len(tokens), "tokens": tokens}
    h._send(200, _encode(answer).encode(), _JSON)
    return None


def _response_format(value: Any) -> tuple[Any, str | None]:
    """``response_format`` as the Ollama side's ``format``, or what is wrong with it."""
    if value is None or (isinstance(value, dict) and value.get("type") == "text"):
        return None, None
    if isinstance(value, dict) and value.get("type") == "json_object":
        # llama.cpp's servers (llama-cpp-python's too) take a schema inside json_object.
        schema = value.get("schema")
        return (schema if isinstance(schema, dict) else "json"), None
    if isinstance(value, dict) and value.get("type") == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return schema, None
        return None, "response_format.json_schema.schema must be an object"
    return None, "response_format.type must be one of 'text', 'json_object', 'json_schema'"


def _flat(message: Any) -> dict[str, Any] | None:
    """A chat message with its content as text (parts joined) and ``images`` the count of
    its ``image_url`` parts; None when its content is neither a string nor such parts (nor
    null in an assistant turn that only called tools)."""
    if not isinstance(message, dict):
        return None
    content = message.get("content", "")
    if content is None and message.get("tool_calls"):
        return {**message, "content": "", "images": 0}
    if isinstance(content, str):
        return {**message, "images": 0}
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        return None
    if any(p.get("type") not in ("text", "image_url") for p in content):
        return None
    text = "".join(str(p.get("text") or "") for p in content if p.get("type") == "text")
    images = sum(1 for p in content if p.get("type") == "image_url")
    return {**message, "content": text, "images": images}


def _texts(body: dict[str, Any], chat: bool) -> tuple[list[Any], str | None]:
    """The texts that make the prompt (a chat's messages with their content as text and
    their images counted), or what is wrong with them."""
    if not chat:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return [], "prompt must be a non-empty string"
        return [prompt], None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return [], "messages must be a non-empty list"
    flat = [_flat(m) for m in messages]
    if any(m is None for m in flat):
        return [], "each message's content must be a string or text and image_url parts"
    return flat, None


def _tool(body: dict[str, Any], messages: list[Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The tool the simulated model calls, or what is wrong with the request's tools: the one
    ``tool_choice`` names, else the first when a call is ``required`` or when the chat ends
    with the user's turn (a tool's result gets a text answer); none with ``tool_choice`` none
    or no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        return None, None if choice is None else "tool_choice is only allowed with tools"
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        for t in tools
    ):
        return None, "tools must be a list of function tools"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        named = [t for t in tools if t["function"].get("name") == name]
        return (named[0], None) if named else (None, f"tool_choice names no tool: {name!r}")
    if choice not in (None, "auto", "none", "required"):
        return None, "tool_choice must be none, auto, required or a named function"
    last_is_user = bool(messages) and messages[-1].get("role") == "user"
    if tools and (choice == "required" or (choice != "none" and last_is_user)):
        return tools[0], None
    return None, None


def chat_completions(h: _Handler, raw: bytes, started: int) -> None:
    _generation(h, raw, started, chat=True)


def completions(h: _Handler, raw: bytes, started: int) -> None:
    _generation(h, raw, started, chat=False)


def request_body(h: _Handler, raw: bytes) -> dict[str, Any] | None:
    """The request's JSON object with a ``model``; None when it is not, once its 400 is
    answered."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        _error(h, 400, "We could not parse the JSON body of your request.")
        return None
    if not isinstance(body, dict):
        _error(h, 400, "The request body must be a JSON object.")
        return None
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        _error(h, 400, "you must provide a model parameter")
        return None
    return body


def _generation(h: _Handler, raw: bytes, started: int, *, chat: bool) -> None:
    """Validate like a real server, then answer within a slot of the shared scheduler."""
    state = h.server.state
    h._generation_call()
    body = request_body(h, raw)
    if body is None:
        return None
    model: str = body["model"]
    texts, err = _texts(body, chat)
    tool, tool_err = _tool(body, texts) if chat and not err else (None, None)
    err = err or tool_err
    fmt, format_err = _response_format(body.get("response_format"))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and not (isinstance(limit, int) and limit > 0):
        err = err or "max_tokens must be a positive integer"
    if (
        body.get("continue_final_message") is True
        and body.get("add_generation_prompt") is not False
    ):
        err = err or "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    if err or format_err:
        return _error(h, 400, str(err or format_err))
    if not state.has_model(model):
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(h, 404, message, "model_not_found")
    contents = [m.get("content") for m in texts] if chat else texts
    prompt_tokens = max(count_words(*contents), 1)
    wanted = prompt_tokens + (limit or 0)
    if wanted > _context(h):
        message = (
            f"This model's maximum context length is {_context(h)} tokens. However, you "
            f"requested {wanted} tokens ({prompt_tokens} in the messages, {limit or 0} in the "
            "completion). Please reduce the length of the messages or completion."
        )
        return _error(h, 400, message, "context_length_exceeded")
    stop = body.get("stop")
    plan: dict[str, Any] = {
        "fmt": fmt,
        "num_predict": limit,
        "default_tokens": state.config.default_tokens,
        "stop": [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None,
        "images": sum(m["images"] for m in texts) if chat else 0,
    }
    if chat:
        # vLLM's continue_final_message: the model continues the trailing assistant message.
        pairs = [(m.get("role"), m.get("content")) for m in texts]
        continuing = body.get("continue_final_message") is True
        reply = plan_chat(
            model, pairs, seed=body.get("seed"), continue_last=continuing, tool=tool, **plan
        )
    else:
        key = reply_key(model, None, texts[0])
        if body.get("seed") is not None:
            key += str(body["seed"]).encode()
        reply = plan_reply(key, **plan)

    def fail(status: int) -> None:
        message, code = _INJECTED.get(status, (f"injected failure {status}", None))
        _error(h, status, message, code)

    h._in_slot(lambda: _Answer(h, body, chat, reply, prompt_tokens, started).send(), fail)


class _Answer:
    """One generation's reply: whole, or as SSE events ending in ``data: [DONE]``."""

    def __init__(
        self,
        h: _Handler,
        body: dict[str, Any],
        chat: bool,
        reply: Reply,
        prompt_tokens: int,
        started: int,
    ) -> None:
        self.h, self.chat, self.reply, self.started = h, chat, reply, started
        self.model: str = body["model"]
        self.stream = body.get("stream") is True
        options = body.get("stream_options")
        self.include_usage = (
            self.stream and isinstance(options, dict) and bool(options.get("include_usage"))
        )
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-sim{next(_ids):08d}"
        self.created = int(time.time())
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reply.eval_count,
            "total_tokens": prompt_tokens + reply.eval_count,
        }

    def _timings(self, evaluated: int) -> dict[str, Any]:
        """llama.cpp's ``timings``: prompt and generation times as the server measured them."""
        finished = time.perf_counter_ns()
        return {
            "prompt_n": self.usage["prompt_tokens"],
            "prompt_ms": (evaluated - self.started) / 1e6,
            "predicted_n": self.usage["completion_tokens"],
            "predicted_ms": (finished - evaluated) / 1e6,
        }

    def _choice(self, text: str, reason: str | None, *, delta: bool, first: bool) -> Any:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if not self.chat:
            choice["text"] = text
        elif not delta:
            choice["message"] = {"role": "assistant", "content": text}
            if self.reply.tool_calls:
                choice["message"].update(content=None, tool_calls=self._calls())
        elif first:
            choice["delta"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text else {}
        return choice

    def _calls(self) -> list[dict[str, Any]]:
        """The reply's tool calls in OpenAI's shape: arguments as JSON text."""
        return [
            {
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _encode(call["function"]["arguments"]),
                },
            }
            for call in self.reply.tool_calls
        ]

    def _call_deltas(self) -> list[Any]:
        """The tool calls as streamed choices: each call's id and name, then its arguments in
        pieces, as OpenAI streams them."""
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(self._calls()):
            head = {"index": index, "id": call["id"], "type": "function"}
            head["function"] = {"name": call["function"]["name"], "arguments": ""}
            first = {"role": "assistant", "content": None} if index == 0 else {}
            deltas.append({**first, "tool_calls": [head]})
            arguments = call["function"]["arguments"]
            for start in range(0, len(arguments), _ARGUMENT_PIECE):
                piece = arguments[start : start + _ARGUMENT_PIECE]
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return [{"index": 0, "delta": d, "finish_reason": None, "logprobs": None} for d in deltas]

    def _object(self, chunk: bool) -> str:
        if not self.chat:
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    def _event(self, choices: list[Any], **extra: Any) -> bytes:
        payload = {
            "id": self.id,
            "object": self._object(True),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = None
        payload.update(extra)
        return b"data: " + _encode(payload).encode() + b"\n\n"

    def send(self) -> None:
        h, state = self.h, self.h.server.state
        rate = state.config.tokens_per_s
        h._pause(state.latency_s())
        evaluated = time.perf_counter_ns()
        tokens, reason = self.reply.tokens, self.reply.done_reason
        if self.reply.tool_calls:
            reason = "tool_calls"
        if not self.stream:
            if rate is not None:
                h._pause(len(tokens) / rate)
            whole = {
                "id": self.id,
                "object": self._object(False),
                "created": self.created,
                "model": self.model,
                "choices": [self._choice("".join(tokens), reason, delta=False, first=True)],
                "usage": self.usage,
                "timings": self._timings(evaluated),
            }
            h._send(200, _encode(whole).encode(), _JSON)
            return
        events = [
            self._event([self._choice(tok, None, delta=True, first=i == 0)])
            for i, tok in enumerate(tokens)
        ] + [self._event([choice]) for choice in self._call_deltas()]

        def write(pieces: list[bytes], first: bool) -> None:
            h._chunks(pieces, first=first, ctype=_SSE)

        if state.take_drop():
            write(events[:1], True)
            h._drop()
        if state.take_interrupt():
            write([*events[:1], _DONE], True)
            h._end_stream()
            return
        if rate is None:
            write(events, True)
        else:
            write([], True)
            for i, event in enumerate(events):
                h._pause(evaluated / 1e9 + (i + 1) / rate - time.perf_counter_ns() / 1e9)
                write([event], False)
        last = self._choice("", reason, delta=True, first=False)
        timings = self._timings(evaluated)
        if self.include_usage:
            tail = [self._event([last]), self._event([], usage=self.usage, timings=timings)]
        else:
            tail = [self._event([last], timings=timings)]
        write([*tail, _DONE], False)
        h._end_stream()


ROUTES: dict[str, dict[str, Callable[[_Handler, bytes, int], None]]] = {
    "/v1/models": {"GET": models},
    "/v1/chat/completions": {"POST": chat_completions},
    "/v1/completions": {"POST": completions},
    "/props": {"GET": props},
    "/tokenize": {"POST": tokenize},
}
