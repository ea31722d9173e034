"""The OpenAI-compatible HTTP API (vLLM, llama.cpp's server, LM Studio, SGLang, TGI, Ollama's
``/v1``), shaped like ``OllamaClient`` where the jobs need it, failures mapped the same way.

Prompts go to ``/v1/chat/completions`` as one user message, not to the legacy
``/v1/completions``: that is what Ollama's ``/api/generate`` does (it applies the model's
chat template), instruction-tuned models answer raw text prompts badly, and some servers serve
chat only or support ``response_format`` on chat only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

import httpx
from pydantic import SecretStr

from avocado_shared.contracts import Usage
from avocado_shared.fleet import ModelMeta
from ollama_worker.inference import (
    BackendRejected,
    BackendUnavailable,
    ChunkSink,
    Completion,
    Embeddings,
    HTTPBackend,
    ModelNotFound,
    short_reason,
    user_message,
    with_partial,
)
from ollama_worker.tool_calls import DeltaCalls, openai_message

__all__ = ["OpenAIClient", "OpenAIRejected", "OpenAIUnavailable", "Server"]

Server = Literal["standard", "llama-cpp-python"]
"""Which OpenAI-compatible server: one that takes OpenAI's own forms (vLLM, llama.cpp's
llama-server, LM Studio, SGLang, Ollama's ``/v1``), or llama-cpp-python's (the embedded
default's), which takes a JSON schema only inside ``json_object`` and answers every request it
cannot handle with a 500."""

# Ollama option -> OpenAI parameter; other Ollama options (num_ctx, num_gpu...) size the
# server itself, which an OpenAI-compatible server fixes at its start: they are left out.
_RENAMED = {"num_predict": "max_tokens"}
_PASSED = frozenset(
    {
        "temperature",
        "top_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        # Not OpenAI's, but vLLM, llama.cpp's server and LM Studio take them.
        "top_k",
        "min_p",
        "repeat_penalty",
    }
)


class OpenAIUnavailable(BackendUnavailable):
    """The server could not answer now: refused, reset, timed out, rate-limited or busy."""


class OpenAIRejected(BackendRejected):
    """The server refused the request itself (a 4xx other than a missing model, or a 500 that
    says the request is invalid)."""


def _message(body: Any) -> str:
    """The text of OpenAI's ``{"error": {"message"}}``, vLLM's older ``{"message"}``, or
    whatever else came."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if error is not None:
            return str(error)
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


def _not_served(model: str, url: str, detail: str) -> ModelNotFound:
    return ModelNotFound(
        f"model {model!r} is not served by the OpenAI-compatible server at {url} ({detail}) "
        "and cannot be pulled through that API: load it on the server or ask for one it serves"
    )


def _options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in _RENAMED:
            if not (isinstance(value, int) and value < 0):  # Ollama's -1: no limit
                params[_RENAMED[name]] = value
        elif name in _PASSED:
            params[name] = value
    return params


def _response_format(format: str | Mapping[str, Any], server: Server) -> dict[str, Any]:
    """Our contract's ``format`` in the server's form: ``"json"`` is JSON mode, a mapping a
    JSON schema (OpenAI's ``json_schema``, or llama-cpp-python's ``json_object`` holding it)."""
    if isinstance(format, str):
        return {"type": "json_object"}
    if server == "llama-cpp-python":
        return {"type": "json_object", "schema": dict(format)}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": dict(format)}}


# An image's first bytes, in base64, and its media type: a data URL names one.
_MEDIA_TYPES = (
    ("iVBORw0KGgo", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
    ("Qk", "image/bmp"),
)


def _data_url(image: str) -> str:
    """A base64 image as the data URL OpenAI's ``image_url`` takes."""
    media = next((kind for head, kind in _MEDIA_TYPES if image.startswith(head)), "image/png")
    return f"data:{media};base64,{image}"


def _openai_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A chat message in OpenAI's form (its tool links as ``tool_calls.openai_message`` makes
    them): one with ``images`` (Ollama's) becomes content parts, its text then each image as a
    data URL; one without keeps its plain text, which servers with no vision take too."""
    images = message.get("images")
    converted = {k: v for k, v in openai_message(message).items() if k != "images"}
    if images:
        text = [{"type": "text", "text": message["content"]}] if message.get("content") else []
        pictures = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
        converted["content"] = text + pictures
    return converted


def _completion(
    text: str,
    model: str,
    reason: str | None,
    usage: Mapping[str, Any],
    timings: Mapping[str, Any],
    elapsed_ms: float,
) -> Completion:
    """Counts from ``usage``, else llama.cpp's ``timings``, which alone carry durations; a
    server that measures nothing gets the wall-clock time the worker waited as its total."""
    prompt_ms = float(timings.get("prompt_ms") or 0)
    eval_ms = float(timings.get("predicted_ms") or 0)
    counted = Usage(
        model=model,
        done_reason=reason,
        prompt_tokens=int(usage.get("prompt_tokens") or timings.get("prompt_n") or 0),
        completion_tokens=int(usage.get("completion_tokens") or timings.get("predicted_n") or 0),
        total_duration_ms=(prompt_ms + eval_ms) or elapsed_ms,
        prompt_eval_duration_ms=prompt_ms,
        eval_duration_ms=eval_ms,
    )
    return Completion(text, counted)


# Tokenizer endpoints, tried in turn: llama-cpp-python's ({"input"} -> {"count"}), then
# vLLM's and llama.cpp's server's ({"prompt"} -> {"count"}, {"content"} -> {"tokens"}).
_TOKENIZE = ("/extras/tokenize/count", "/tokenize")


def _token_count(answer: Any) -> int | None:
    if not isinstance(answer, dict):
        return None
    if isinstance(answer.get("count"), int):
        return int(answer["count"])
    tokens = answer.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _showing_images(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``events``, a refusal of which names the images: a server whose model cannot see may
    say so in words that do not (llama-cpp-python's: "can only concatenate str")."""
    try:
        yield from events
    except OpenAIRejected as error:
        raise OpenAIRejected(f"{error}; the request shows images: can its model see?") from None


class OpenAIClient(HTTPBackend):
    """A client for one OpenAI-compatible server at ``base_url`` (ending in ``/v1``), made
    once per worker process; the API key goes out as a Bearer token and nowhere else."""

    can_pull = False
    label: ClassVar[str] = "openai-compatible server"
    provider: ClassVar[str] = "openai"  # its API's; the server behind may be any
    unavailable: ClassVar[type[BackendUnavailable]] = OpenAIUnavailable
    rejected: ClassVar[type[BackendRejected]] = OpenAIRejected

    def __init__(
        self,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        server: Server = "standard",
        **http: Any,
    ) -> None:
        """``server``: which one it is (``Server``); ``http``: ``HTTPBackend``'s timeouts
        and transport."""
        headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
        super().__init__(base_url, headers=headers, **http)
        self.server = server
        self.refuses_with_500 = server == "llama-cpp-python"
        self._contexts: dict[str, int] = {}
        self._contexts_lock = threading.Lock()
        self._tokenize: list[str] = list(_TOKENIZE)  # narrowed to the one that answers

    def __enter__(self) -> OpenAIClient:
        return self

    def _error_text(self, response: httpx.Response) -> str:
        try:
            return _message(response.json())
        except ValueError:
            return response.text.strip() or response.reason_phrase

    def _not_found(self, model: str, reason: str) -> ModelNotFound:
        return _not_served(model, self.base_url, f"404: {reason}")

    def _model_entries(self) -> list[dict[str, Any]]:
        data = self._request("GET", "/models").get("data") or []
        return [entry for entry in data if isinstance(entry, dict) and "id" in entry]

    def models(self) -> list[str]:
        """Ids of the models the server serves (``GET /v1/models``)."""
        return [str(entry["id"]) for entry in self._model_entries()]

    def has_model(self, model: str) -> bool:
        """True when the server lists ``model``."""
        return model in self.models()

    def loaded(self) -> list[str]:
        """What it serves is loaded: this API loads no model on demand."""
        return self.models()

    def _props(self) -> dict[str, Any]:
        """llama.cpp's server's ``GET /props``; empty from other servers."""
        try:
            props = self._request("GET", f"{self.base_url.removesuffix('/v1')}/props")
        except (BackendRejected, ModelNotFound):  # not llama.cpp's server
            return {}
        return props if isinstance(props, dict) else {}

    def slots(self) -> int | None:
        """Requests the server runs at once, where it says: llama.cpp's ``total_slots`` in
        ``GET /props``; None from other servers."""
        return _int(self._props().get("total_slots"))

    def pull(self, model: str, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """This API has no pull: a model the server does not serve fails the job at once."""
        served = ", ".join(self.models()) or "none"
        raise _not_served(model, self.base_url, f"it serves: {served}")

    def describe(self, model: str) -> ModelMeta:
        """What the server says of ``model``: vLLM's ``max_model_len`` and llama.cpp's
        ``meta`` in ``/v1/models``, llama.cpp's context, modalities and its chat template's
        tool support in ``GET /props``. Any model here completes (chat); an embedding model
        is not told apart by this API."""
        entry = next((e for e in self._model_entries() if e["id"] == model), {})
        meta: dict[str, Any] = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
        props = self._props()
        settings = props.get("default_generation_settings") or {}
        caps = props.get("chat_template_caps") or {}
        modalities = props.get("modalities") or {}
        created = _int(entry.get("created"))
        return ModelMeta(
            context_length=_int(entry.get("max_model_len"))
            or _int(meta.get("n_ctx"))
            or _int(settings.get("n_ctx"))
            or _int(props.get("n_ctx")),
            parameter_count=_int(meta.get("n_params")),
            embedding_length=_int(meta.get("n_embd")),
            capabilities=[
                "completion",
                *(["tools"] if caps.get("supports_tools") is True else []),
                *(["vision"] if modalities.get("vision") is True else []),
            ],
            modified_at=None if created is None else datetime.fromtimestamp(created, timezone.utc),
        )

    def context_length(self, model: str) -> int | None:
        """The context the server runs ``model`` with, where it says (``describe``)."""
        return self.describe(model).context_length

    def summary_context(self, model: str, configured: int) -> int:
        """The server's real context, asked once per model; the configured one if it won't say."""
        with self._contexts_lock:
            known = self._contexts.get(model)
        if known is None:
            known = self.context_length(model) or configured
            with self._contexts_lock:
                self._contexts[model] = known
        return known

    def count_tokens(self, model: str, text: str) -> int | None:
        """Tokens of ``text`` in ``model``'s own tokenizer, where the server has an endpoint
        for it (llama-cpp-python, llama.cpp's server, vLLM); None where it has none."""
        root = self.base_url.removesuffix("/v1")
        body = {"model": model, "input": text, "prompt": text, "content": text}
        for path in tuple(self._tokenize):
            try:
                count = _token_count(self._request("POST", f"{root}{path}", body))
            except (BackendRejected, ModelNotFound):  # not this server's endpoint
                count = None
            if count is not None:
                self._tokenize = [path]
                return count
        self._tokenize = []  # it has none: not asked again
        return None

    def embed(
        self,
        model: str,
        texts: Sequence[str],
        *,
        dimensions: int | None = None,
        **ollama_only: Any,
    ) -> Embeddings:
        """The vectors of ``texts`` in one ``/v1/embeddings`` call, as floats, in their order
        (``data`` says each one's ``index``). Ollama-only arguments (``truncate``, ``options``,
        ``keep_alive``) have no meaning here: a server cuts long texts as it was started to."""
        body: dict[str, Any] = {"model": model, "input": list(texts), "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        started = time.monotonic()
        answer = self._request("POST", "/embeddings", body)
        data = sorted(answer.get("data") or [], key=lambda item: int(item.get("index", 0)))
        counts = answer.get("usage") or {}
        usage = Usage(
            model=str(answer.get("model") or model),
            prompt_tokens=int(counts.get("prompt_tokens") or 0),
            total_duration_ms=(time.monotonic() - started) * 1000,
        )
        return Embeddings([list(item["embedding"]) for item in data], usage)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[str] | None = None,
        **params: Any,
    ) -> Completion:
        """A prompt as one user message (after ``system``), then as ``chat``."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append(user_message(prompt, images))
        return self.chat(model, messages, **params)

    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        format: str | Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        on_chunk: ChunkSink | None = None,
        partial: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **ollama_only: Any,
    ) -> Completion:
        """Run ``/v1/chat/completions`` streamed and return the assistant's whole answer (its
        text and tool calls); each piece of text goes to ``on_chunk`` as it comes. A
        ``partial`` answer is continued with vLLM's ``continue_final_message`` (also SGLang's,
        TGI's, llama.cpp's server's) and leads the returned text. Ollama-only arguments
        (``keep_alive``) have no meaning here."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [_openai_message(m) for m in with_partial(messages, partial)],
            "stream": True,
            "stream_options": {"include_usage": True},
            **_options(options),
        }
        asked = {
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
        }
        body.update({name: value for name, value in asked.items() if value is not None})
        if partial:
            body.update(continue_final_message=True, add_generation_prompt=False)
        if format is not None:
            body["response_format"] = _response_format(format, self.server)
        parts: list[str] = []
        calls = DeltaCalls()
        served, reason = model, None
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        started = time.monotonic()
        events = self._events("/chat/completions", body)
        if any(m.get("images") for m in messages):
            events = _showing_images(events)
        for event in events:
            served = str(event.get("model") or served)
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                calls.add(delta.get("tool_calls") or ())
                parts.append(text)
                if on_chunk is not None and text:
                    on_chunk(text)
                reason = choice.get("finish_reason") or reason
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
        if reason is None:
            # llama-cpp-python's server ends a stream this way when another request arrives
            # (unless started with --interrupt_requests False): the answer is cut short.
            raise OpenAIUnavailable(
                f"{self.label} at {self.base_url} ended the answer without a finish_reason: "
                "it was cut short"
            )
        if not usage and not timings:
            # llama-cpp-python's server reports no usage in a stream; it streams a token a
            # chunk, so the chunks that carried text are the completion's tokens.
            usage = {"completion_tokens": sum(1 for part in parts if part)}
        elapsed_ms = (time.monotonic() - started) * 1000
        done = _completion(partial + "".join(parts), served, reason, usage, timings, elapsed_ms)
        return replace(done, tool_calls=tuple(calls.calls()))

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Each SSE ``data:`` event up to ``data: [DONE]``; a stream that ends before it was
        cut, so the answer is incomplete: transient, like a reset connection. Except an empty
        one from llama-cpp-python's server: that is how it fails a streamed request it cannot
        handle (the reason goes to its own log only)."""
        began = False
        for line in self._lines(path, body):
            if not line.startswith("data:"):
                continue  # SSE comments and event names
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise OpenAIUnavailable(
                    f"{self.label} failed mid-stream: {short_reason(_message(event))}"
                )
            began = True
            yield event
        if not began and self.server == "llama-cpp-python":
            raise OpenAIRejected(
                f"{self.label} refused the request: it ended the answer before it began, "
                "without a reason (its own log has it)"
            )
        raise OpenAIUnavailable(f"{self.label} at {self.base_url} ended the stream before [DONE]")
