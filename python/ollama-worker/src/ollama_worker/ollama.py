"""Ollama's HTTP API over one long-lived httpx client, with failures mapped to our error kinds."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import httpx

from avocado_shared.contracts import ToolCall, Usage
from avocado_shared.fleet import ModelMeta
from avocado_shared.routing import canonical_model, canonical_models
from ollama_worker.inference import (
    BackendRejected,
    BackendUnavailable,
    ChunkSink,
    Completion,
    DeadlinePassed,
    Embeddings,
    HTTPBackend,
    ModelNotFound,
    short_reason,
    user_message,
    with_partial,
)
from ollama_worker.tool_calls import ollama_calls, ollama_message

__all__ = [
    "Completion",
    "DeadlinePassed",
    "ModelNotFound",
    "OllamaClient",
    "OllamaRejected",
    "OllamaUnavailable",
]


class OllamaUnavailable(BackendUnavailable):
    """Ollama could not answer now: refused, reset, timed out, busy or behind a failing tunnel."""


class OllamaRejected(BackendRejected):
    """Ollama refused the request itself (a 4xx other than a missing model)."""


def _completion(text: str, final: Mapping[str, Any]) -> Completion:
    """Build from the accumulated text and the last (``done``) chunk of a stream."""

    def ms(name: str) -> float:
        return int(final.get(name) or 0) / 1e6  # Ollama's durations are in ns

    usage = Usage(
        model=str(final.get("model", "")),
        done_reason=final.get("done_reason"),
        prompt_tokens=int(final.get("prompt_eval_count") or 0),
        completion_tokens=int(final.get("eval_count") or 0),
        total_duration_ms=ms("total_duration"),
        load_duration_ms=ms("load_duration"),
        prompt_eval_duration_ms=ms("prompt_eval_duration"),
        eval_duration_ms=ms("eval_duration"),
    )
    return Completion(text, usage)


class OllamaClient(HTTPBackend):
    """A client for one Ollama server, made once per worker process and closed on shutdown."""

    label: ClassVar[str] = "ollama"
    provider: ClassVar[str] = "ollama"
    unavailable: ClassVar[type[BackendUnavailable]] = OllamaUnavailable
    rejected: ClassVar[type[BackendRejected]] = OllamaRejected
    can_pull = True

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        pull_timeout: float = 1800.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            transport=transport,
        )
        self._pull_timeout = httpx.Timeout(pull_timeout, connect=connect_timeout)

    def __enter__(self) -> OllamaClient:
        return self

    def _error_text(self, response: httpx.Response) -> str:
        """Ollama's ``{"error": "..."}``, or whatever else came."""
        try:
            body = response.json()
        except ValueError:
            return response.text.strip() or response.reason_phrase
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
        return str(body)

    def _not_found(self, model: str, reason: str) -> ModelNotFound:
        return ModelNotFound(f"model {model!r} not found: {reason}")

    def _stream(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> Iterator[dict[str, Any]]:
        """POST and yield each NDJSON chunk; an ``error`` chunk mid-stream is raised."""
        for line in self._lines(path, body, timeout):
            chunk = json.loads(line)
            if "error" in chunk:
                raise OllamaUnavailable(
                    f"ollama failed mid-stream: {short_reason(str(chunk['error']))}"
                )
            yield chunk

    def version(self) -> str:
        """The server's version; also a cheap health check."""
        return str(self._request("GET", "/api/version")["version"])

    def models(self) -> list[str]:
        """Names of the models present on this host."""
        return [m["name"] for m in self._request("GET", "/api/tags").get("models", [])]

    def has_model(self, model: str) -> bool:
        """True when ``model`` is already pulled."""
        return canonical_model(model) in canonical_models(self.models())

    def loaded(self) -> list[str]:
        """Names of the models in memory now (``/api/ps``)."""
        return [m["name"] for m in self._request("GET", "/api/ps").get("models", [])]

    def slots(self) -> int | None:
        """Ollama's API does not say how many requests it runs at once (``OLLAMA_NUM_PARALLEL``)."""
        return None

    def summary_context(self, model: str, configured: int) -> int:
        """Ollama sizes the context per request (``num_ctx``), so the configured one holds."""
        return configured

    def count_tokens(self, model: str, text: str) -> int | None:
        """Ollama's API has no tokenizer endpoint: summaries estimate (``summary``)."""
        return None

    def describe(self, model: str) -> ModelMeta:
        """What ``/api/show`` says of ``model``: its details, its sizes and its capabilities."""
        return _meta(self._request("POST", "/api/show", {"model": model}))

    def context_length(self, model: str) -> int | None:
        """The model's trained context length, from ``/api/show``, when it reports one."""
        return self.describe(model).context_length

    def embed(
        self,
        model: str,
        texts: Sequence[str],
        *,
        dimensions: int | None = None,
        truncate: bool = True,
        options: Mapping[str, Any] | None = None,
        keep_alive: str | int | None = None,
    ) -> Embeddings:
        """The vectors of ``texts`` in one ``/api/embed`` call (Ollama cuts and rescales them
        to ``dimensions`` itself)."""
        fields = {"input": list(texts), "dimensions": dimensions, "truncate": truncate}
        body = _body(model, options, None, keep_alive, **fields)
        del body["stream"]  # an embedding is one answer
        answer = self._request("POST", "/api/embed", body)
        usage = _completion("", {**answer, "done_reason": None}).usage
        return Embeddings([list(v) for v in answer.get("embeddings") or []], usage)

    def pull(self, model: str, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Download ``model``; each progress line goes to ``progress``."""
        body = {"model": model, "stream": True}
        try:
            for chunk in self._stream("/api/pull", body, timeout=self._pull_timeout):
                if progress is not None:
                    progress(chunk)
        except OllamaUnavailable as error:
            if "file does not exist" in str(error) or "not found" in str(error):
                raise ModelNotFound(f"model {model!r} cannot be pulled: {error}") from error
            raise

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[str] | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        keep_alive: str | int | None = None,
        on_chunk: ChunkSink | None = None,
        partial: str = "",
    ) -> Completion:
        """Run ``/api/generate`` streamed, so a slow model never trips a whole-response timeout.

        With a ``partial`` answer to continue, ``/api/chat`` instead: Ollama renders a prompt
        as that very chat (``system``, then the prompt as the user's message), and continues a
        trailing assistant message there (ollama/ollama#6778); raw mode would need the model's
        template, which only the server knows.
        """
        if partial:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append(user_message(prompt, images))
            return self.chat(
                model,
                messages,
                options=options,
                format=format,
                keep_alive=keep_alive,
                on_chunk=on_chunk,
                partial=partial,
            )
        body = _body(
            model, options, format, keep_alive, prompt=prompt, system=system, images=images
        )
        return self._complete(
            "/api/generate", body, lambda chunk: chunk.get("response", ""), on_chunk
        )

    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        keep_alive: str | int | None = None,
        on_chunk: ChunkSink | None = None,
        partial: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> Completion:
        """Run ``/api/chat`` streamed and return the assistant's whole answer; each piece
        goes to ``on_chunk`` as it comes. A ``partial`` answer is continued, and leads the
        returned text.

        Ollama's API has no ``tool_choice``: ``none`` sends no tools, ``auto`` is its way;
        a choice that forces a call fails at once (``OllamaRejected``) rather than be ignored.
        ``parallel_tool_calls=False`` keeps the first call of an answer that made several."""
        if tool_choice not in (None, "auto", "none"):
            raise OllamaRejected(
                f"tool_choice {tool_choice!r} cannot be honoured: Ollama's API cannot force a "
                "tool call (send auto or none, or use an OpenAI-compatible backend)"
            )
        wire = [ollama_message(m) for m in with_partial(messages, partial)]
        offered = tools if tool_choice != "none" else None
        body = _body(model, options, format, keep_alive, messages=wire, tools=offered)
        done = self._complete(
            "/api/chat",
            body,
            lambda chunk: (chunk.get("message") or {}).get("content", ""),
            on_chunk,
            partial,
        )
        if parallel_tool_calls is False and len(done.tool_calls) > 1:
            return replace(done, tool_calls=done.tool_calls[:1])
        return done

    def _complete(
        self,
        path: str,
        body: dict[str, Any],
        text_of: Callable[[dict[str, Any]], str],
        on_chunk: ChunkSink | None = None,
        partial: str = "",
    ) -> Completion:
        """Accumulate a streamed answer and the tool calls of its chunks (whole in one, in
        Ollama's API); the last chunk carries the counts and durations."""
        parts = [partial]
        calls: list[ToolCall] = []
        final: dict[str, Any] = {}
        for chunk in self._stream(path, body):
            text = text_of(chunk)
            parts.append(text)
            if on_chunk is not None and text:
                on_chunk(text)
            calls += ollama_calls((chunk.get("message") or {}).get("tool_calls") or ())
            final = chunk
        return replace(_completion("".join(parts), final), tool_calls=tuple(calls))


def _meta(shown: Mapping[str, Any]) -> ModelMeta:
    """``/api/show``'s answer as the fleet keeps it: ``details``, ``capabilities``,
    ``modified_at`` and, of ``model_info``, the architecture and its sizes (not the tokenizer's
    vocabulary, which a verbose answer holds whole)."""
    details = shown.get("details") or {}
    info = shown.get("model_info") or {}

    def sized(name: str) -> int | None:  # ``<architecture>.context_length`` and the like
        found = (v for k, v in info.items() if k.endswith(f".{name}") and isinstance(v, int))
        return next(found, None)

    return ModelMeta.model_validate(
        {
            **{k: v for k, v in details.items() if v not in ("", None)},
            "architecture": info.get("general.architecture"),
            "parameter_count": info.get("general.parameter_count"),
            "context_length": sized("context_length"),
            "embedding_length": sized("embedding_length"),
            "capabilities": shown.get("capabilities") or [],
            "modified_at": shown.get("modified_at"),
        }
    )


def _body(
    model: str,
    options: Mapping[str, Any] | None,
    format: str | Mapping[str, Any] | None,
    keep_alive: str | int | None,
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True}
    body.update({k: v for k, v in fields.items() if v is not None})
    if options:
        body["options"] = dict(options)
    if format is not None:
        body["format"] = format
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    return body
