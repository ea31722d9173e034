"""What every inference backend shares: its error kinds, the job deadline and the HTTP plumbing.

Ollama's native API (``ollama.py``) and the OpenAI-compatible one (``openai_backend.py``) differ
in paths and bodies only; both fail the same two ways and both must end within the job's time.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from avocado_shared.contracts import ToolCall, Usage
from ollama_worker.errors import JobTimedOut, PermanentError, TransientError

__all__ = [
    "BackendRejected",
    "BackendUnavailable",
    "ChunkSink",
    "Completion",
    "DeadlinePassed",
    "Embeddings",
    "HTTPBackend",
    "ModelNotFound",
    "retry_after",
    "says_invalid",
    "short_reason",
    "user_message",
    "with_partial",
]

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

ChunkSink = Callable[[str], None]
"""Called with each piece of an answer as the server streams it (the job's token stream)."""

# A timeout cut to the deadline may fire a hair before it (clock granularity): still the limit.
_TIMEOUT_SLACK_S = 0.05


class BackendUnavailable(TransientError):
    """The server could not answer now: refused, reset, timed out, busy or behind a failing
    tunnel."""


class BackendRejected(PermanentError):
    """The server refused the request itself: a 4xx other than a missing model, or a 500 whose
    body says the request is invalid. The job's client is at fault, not the fleet."""


class ModelNotFound(PermanentError):
    """The model is not on this host and may not, or could not, be pulled."""


class DeadlinePassed(JobTimedOut):
    """The job's time limit came while it waited on its server (see ``HTTPBackend.deadline``)."""


def _bounded(timeout: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    """``timeout`` cut down to what is left until ``deadline``, if there is one."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlinePassed("the time limit came before the call to the inference server")

    def cut(value: float | None) -> float:
        return left if value is None else min(value, left)

    return httpx.Timeout(
        connect=cut(timeout.connect),
        read=cut(timeout.read),
        write=cut(timeout.write),
        pool=cut(timeout.pool),
    )


def _check_deadline(deadline: float | None, slack: float = 0.0) -> None:
    if deadline is not None and time.monotonic() >= deadline - slack:
        raise DeadlinePassed("the time limit came while the inference server was still answering")


# pydantic's (and FastAPI's) report of a request it refused: "1 validation error ...".
_VALIDATION = re.compile(r"\b\d+ validation errors?\b")
_PYDANTIC_ITEM = re.compile(r"'loc': \(([^)]*)\), 'msg': (['\"])(.*?)\2")
# A file path standing alone ("/usr/lib/..."), not the path of a model's name or a URL.
_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+~-]+){2,}")
_REASON_MAX = 300


def says_invalid(text: str) -> bool:
    """Whether a server's error text is a validation error: the request is at fault,
    whatever status came with it (llama-cpp-python's server answers those 500)."""
    return bool(_VALIDATION.search(text))


def _where(loc: str) -> str:
    """pydantic's ``('body', 'response_format', 'type')`` as ``response_format.type``."""
    parts = (part.strip().strip("'\"") for part in loc.split(","))
    return ".".join(part for part in parts if part and part != "body")


def short_reason(text: str) -> str:
    """A server's error in one line fit for a client: pydantic's items as ``where: what``,
    else its first line; file paths blanked, no stack (the worker's log has the whole)."""
    items = [f"{_where(loc)}: {msg}" for loc, _, msg in _PYDANTIC_ITEM.findall(text)]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = "; ".join(items) or (lines[0] if lines else "no reason given")
    reason = _PATH.sub("<path>", reason)
    return reason if len(reason) <= _REASON_MAX else reason[: _REASON_MAX - 1] + "…"


def with_partial(messages: Sequence[Mapping[str, Any]], partial: str) -> list[dict[str, Any]]:
    """``messages`` and, when an answer was begun (a redelivered job's stream), that start as
    a trailing assistant message, which the server continues instead of answering anew."""
    continued = [dict(m) for m in messages]
    if partial:
        continued.append({"role": "assistant", "content": partial})
    return continued


def user_message(prompt: str, images: Sequence[str] | None = None) -> dict[str, Any]:
    """A prompt as the user's chat message, with the images it shows (Ollama's form)."""
    message: dict[str, Any] = {"role": "user", "content": prompt}
    if images:
        message["images"] = list(images)
    return message


def retry_after(response: httpx.Response) -> float | None:
    """The server's ``Retry-After`` in seconds (``retry-after-ms`` too, as OpenAI sends)."""
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class Completion:
    """One finished generation: the text, the tool calls the model made, and what it cost,
    as the server measured it."""

    text: str
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def combine(cls, text: str, parts: Sequence[Completion]) -> Completion:
        """One completion standing for several calls (a chunked summary): costs add up."""
        return cls(text, Usage.total([p.usage for p in parts]))


@dataclass(frozen=True)
class Embeddings:
    """The vectors of one request's texts, in their order, and what they cost."""

    vectors: list[list[float]]
    usage: Usage


class HTTPBackend:
    """One long-lived httpx client to one server, its failures mapped to our error kinds.

    Subclasses name the server (``label``), their error classes, how an error answer reads
    (``_error_text``) and what a missing model is (``_not_found``).
    """

    label: ClassVar[str] = "inference server"
    unavailable: ClassVar[type[BackendUnavailable]] = BackendUnavailable
    rejected: ClassVar[type[BackendRejected]] = BackendRejected
    # A server that answers 500 to every request it cannot handle (llama-cpp-python's): its
    # 500s are the request's fault, not the server's state.
    refuses_with_500: bool = False

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"User-Agent": "avocado-ollama-worker", **(headers or {})},
            transport=transport,
        )
        # Per thread: a pool thread runs one job at a time, and the threads pool shares a client.
        self._job = threading.local()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    @contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Make every call in this block, in this thread, end within ``seconds`` or raise
        ``DeadlinePassed``: a job's time limit that holds in any pool, including the threads
        pool, where Celery enforces none, and a stalled stream cannot hold its slot."""
        outer = self._deadline()
        self._job.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            yield
        finally:
            self._job.deadline = outer

    def _deadline(self) -> float | None:
        """When this thread's job must be done (``time.monotonic()``), if it has a limit."""
        deadline: float | None = getattr(self._job, "deadline", None)
        return deadline

    def __enter__(self) -> HTTPBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error_text(self, response: httpx.Response) -> str:
        raise NotImplementedError

    def _not_found(self, model: str, reason: str) -> ModelNotFound:
        raise NotImplementedError

    def _raise_for_status(self, response: httpx.Response, model: str | None) -> None:
        """Map an error answer to ``unavailable`` (worth retrying), ``ModelNotFound`` or
        ``rejected``: the request itself is at fault, whatever the status says; the message
        is the fleet's, the server's whole answer goes to the log."""
        status = response.status_code
        if status < 400:
            return
        text = self._error_text(response)
        reason = short_reason(text)
        refused = status == 500 and (self.refuses_with_500 or says_invalid(text))
        if status in TRANSIENT_STATUS and not refused:
            message = f"{self.label} answered {status}: {reason}"
            raise self.unavailable(message, retry_after(response))
        if status == 404 and model is not None:
            raise self._not_found(model, reason)
        logger.warning(
            "%s at %s refused a request (%d): %s", self.label, self.base_url, status, text
        )
        raise self.rejected(f"{self.label} refused the request: {reason}")

    def _transport_failed(self, error: httpx.TransportError) -> BackendUnavailable:
        _check_deadline(self._deadline(), _TIMEOUT_SLACK_S)
        return self.unavailable(f"{self.label} at {self.base_url}: {error!r}")

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            timeout = _bounded(self._http.timeout, self._deadline())
            response = self._http.request(method, path, json=body, timeout=timeout)
        except httpx.TransportError as error:
            raise self._transport_failed(error) from error
        model = body.get("model") if isinstance(body, dict) else None
        self._raise_for_status(response, model)
        return response.json()

    def _lines(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> Iterator[str]:
        """POST and yield each non-blank line of the streamed answer, within the deadline."""
        try:
            deadline = self._deadline()
            bounded = _bounded(timeout or self._http.timeout, deadline)
            with self._http.stream("POST", path, json=body, timeout=bounded) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for_status(response, body.get("model"))
                for line in response.iter_lines():
                    _check_deadline(deadline)
                    if line.strip():
                        yield line
        except httpx.TransportError as error:
            raise self._transport_failed(error) from error
