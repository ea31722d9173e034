"""Ollama's HTTP API over one long-lived httpx client, with failures mapped to our error kinds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx

from ollama_worker.errors import JobTimedOut, PermanentError, TransientError

__all__ = [
    "Completion",
    "DeadlinePassed",
    "ModelNotFound",
    "OllamaClient",
    "OllamaRejected",
    "OllamaUnavailable",
]

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

# When the running job must be done (time.monotonic()), per thread: a pool thread runs one job.
_DEADLINE: ContextVar[float | None] = ContextVar("ollama_deadline", default=None)


class OllamaUnavailable(TransientError):
    """Ollama could not answer now: refused, reset, timed out, busy or behind a failing tunnel."""


class OllamaRejected(PermanentError):
    """Ollama refused the request itself (a 4xx other than a missing model)."""


class ModelNotFound(PermanentError):
    """The model is not on this host and may not, or could not, be pulled."""


class DeadlinePassed(JobTimedOut):
    """The job's time limit came while it waited on Ollama (see ``OllamaClient.deadline``)."""


def _bounded(timeout: httpx.Timeout) -> httpx.Timeout:
    """``timeout`` cut down to what is left of this thread's deadline, if it has one."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlinePassed("the time limit came before the call to Ollama")

    def cut(value: float | None) -> float:
        return left if value is None else min(value, left)

    return httpx.Timeout(
        connect=cut(timeout.connect),
        read=cut(timeout.read),
        write=cut(timeout.write),
        pool=cut(timeout.pool),
    )


# A timeout cut to the deadline may fire a hair before it (clock granularity): still the limit.
_TIMEOUT_SLACK_S = 0.05


def _check_deadline(slack: float = 0.0) -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() >= deadline - slack:
        raise DeadlinePassed("the time limit came while Ollama was still answering")


@dataclass(frozen=True)
class Completion:
    """One finished generation: the text and what Ollama measured (durations in ns)."""

    text: str
    model: str
    done_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_duration_ns: int = 0
    load_duration_ns: int = 0
    prompt_eval_duration_ns: int = 0
    eval_duration_ns: int = 0

    @classmethod
    def combine(cls, text: str, parts: Sequence[Completion]) -> Completion:
        """One completion standing for several calls (a chunked summary): costs add up."""
        last = parts[-1]
        return cls(
            text=text,
            model=last.model,
            done_reason=last.done_reason,
            prompt_tokens=sum(p.prompt_tokens for p in parts),
            completion_tokens=sum(p.completion_tokens for p in parts),
            total_duration_ns=sum(p.total_duration_ns for p in parts),
            load_duration_ns=sum(p.load_duration_ns for p in parts),
            prompt_eval_duration_ns=sum(p.prompt_eval_duration_ns for p in parts),
            eval_duration_ns=sum(p.eval_duration_ns for p in parts),
        )

    @classmethod
    def from_final(cls, text: str, final: Mapping[str, Any]) -> Completion:
        """Build from the accumulated text and the last (``done``) chunk of a stream."""
        return cls(
            text=text,
            model=str(final.get("model", "")),
            done_reason=final.get("done_reason"),
            prompt_tokens=int(final.get("prompt_eval_count") or 0),
            completion_tokens=int(final.get("eval_count") or 0),
            total_duration_ns=int(final.get("total_duration") or 0),
            load_duration_ns=int(final.get("load_duration") or 0),
            prompt_eval_duration_ns=int(final.get("prompt_eval_duration") or 0),
            eval_duration_ns=int(final.get("eval_duration") or 0),
        )


def _same_model(a: str, b: str) -> bool:
    """``llama3.2`` and ``llama3.2:latest`` name the same model."""

    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return norm(a) == norm(b)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _raise_for_status(response: httpx.Response, model: str | None) -> None:
    """Map an error answer to ``OllamaUnavailable``, ``ModelNotFound`` or ``OllamaRejected``."""
    if response.status_code < 400:
        return
    text = _error_text(response)
    status = response.status_code
    if status in _TRANSIENT_STATUS:
        raise OllamaUnavailable(f"ollama answered {status}: {text}", _retry_after(response))
    if status == 404 and model is not None:
        raise ModelNotFound(f"model {model!r} not found: {text}")
    raise OllamaRejected(f"ollama answered {status}: {text}")


class OllamaClient:
    """A client for one Ollama server, made once per worker process and closed on shutdown."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        pull_timeout: float = 1800.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._pull_timeout = httpx.Timeout(pull_timeout, connect=connect_timeout)
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"User-Agent": "avocado-ollama-worker"},
            transport=transport,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    @contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Make every call in this block, in this thread, end within ``seconds`` or raise
        ``DeadlinePassed``: a job's time limit that holds in any pool, including the threads
        pool, where Celery enforces none, and a stalled stream cannot hold its slot."""
        token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
        try:
            yield
        finally:
            _DEADLINE.reset(token)

    def __enter__(self) -> OllamaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            timeout = _bounded(self._http.timeout)
            response = self._http.request(method, path, json=body, timeout=timeout)
        except httpx.TransportError as error:
            _check_deadline(_TIMEOUT_SLACK_S)
            raise OllamaUnavailable(f"ollama at {self.base_url}: {error!r}") from error
        model = body.get("model") if isinstance(body, dict) else None
        _raise_for_status(response, model)
        return response.json()

    def _stream(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> Iterator[dict[str, Any]]:
        """POST and yield each NDJSON chunk; an ``error`` chunk mid-stream is raised."""
        try:
            bounded = _bounded(timeout or self._http.timeout)
            with self._http.stream("POST", path, json=body, timeout=bounded) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response, body.get("model"))
                for line in response.iter_lines():
                    _check_deadline()
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:
                        raise OllamaUnavailable(f"ollama failed mid-stream: {chunk['error']}")
                    yield chunk
        except httpx.TransportError as error:
            _check_deadline(_TIMEOUT_SLACK_S)
            raise OllamaUnavailable(f"ollama at {self.base_url}: {error!r}") from error

    def version(self) -> str:
        """The server's version; also a cheap health check."""
        return str(self._request("GET", "/api/version")["version"])

    def models(self) -> list[str]:
        """Names of the models present on this host."""
        return [m["name"] for m in self._request("GET", "/api/tags").get("models", [])]

    def has_model(self, model: str) -> bool:
        """True when ``model`` is already pulled."""
        return any(_same_model(model, name) for name in self.models())

    def context_length(self, model: str) -> int | None:
        """The model's trained context length, from ``/api/show``, when it reports one."""
        info = self._request("POST", "/api/show", {"model": model}).get("model_info") or {}
        for key, value in info.items():
            if key.endswith(".context_length") and isinstance(value, int):
                return value
        return None

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
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        keep_alive: str | int | None = None,
    ) -> Completion:
        """Run ``/api/generate`` streamed, so a slow model never trips a whole-response timeout."""
        body = _body(model, options, format, keep_alive, prompt=prompt, system=system)
        return self._complete("/api/generate", body, lambda chunk: chunk.get("response", ""))

    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        keep_alive: str | int | None = None,
    ) -> Completion:
        """Run ``/api/chat`` streamed and return the assistant's whole answer."""
        body = _body(model, options, format, keep_alive, messages=list(messages))
        return self._complete(
            "/api/chat", body, lambda chunk: (chunk.get("message") or {}).get("content", "")
        )

    def _complete(
        self, path: str, body: dict[str, Any], text_of: Callable[[dict[str, Any]], str]
    ) -> Completion:
        """Accumulate a streamed answer; the last chunk carries the counts and durations."""
        parts: list[str] = []
        final: dict[str, Any] = {}
        for chunk in self._stream(path, body):
            parts.append(text_of(chunk))
            final = chunk
        return Completion.from_final("".join(parts), final)


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
