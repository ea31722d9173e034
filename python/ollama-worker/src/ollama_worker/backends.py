"""What the worker asks of an inference server (``Backend``), and the one place the settings
pick the client that serves it: Ollama's or an OpenAI-compatible one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict

from avocado_shared.fleet import ModelMeta
from ollama_worker.inference import ChunkSink, Completion, Embeddings
from ollama_worker.ollama import OllamaClient
from ollama_worker.openai_backend import OpenAIClient
from ollama_worker.settings import WorkerSettings

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11

__all__ = ["Answer", "Backend", "ChatAnswer", "make_backend", "pull_progress"]

logger = logging.getLogger(__name__)


class Answer(TypedDict, total=False):
    """How to answer: the server's options, the answer's format, how long the model stays
    loaded (Ollama), where each piece goes as it comes, and the start to continue."""

    options: Mapping[str, Any] | None
    format: str | Mapping[str, Any] | None
    keep_alive: str | int | None
    on_chunk: ChunkSink | None
    partial: str


class ChatAnswer(Answer, total=False):
    """How to answer a chat: ``Answer``'s and the tools the model may call."""

    tools: Sequence[Mapping[str, Any]] | None
    tool_choice: str | Mapping[str, Any] | None
    parallel_tool_calls: bool | None


class Backend(Protocol):
    """An inference client: failures raised as ``BackendUnavailable`` (transient),
    ``BackendRejected`` or ``ModelNotFound`` (permanent), every call of a job within its
    ``deadline``."""

    # Who serves the model, as OpenTelemetry's GenAI conventions name it (gen_ai.provider.name).
    provider: ClassVar[str]

    @property
    def can_pull(self) -> bool:
        """Whether ``pull`` can fetch a missing model (else it raises ``ModelNotFound``)."""

    def models(self) -> list[str]: ...

    def has_model(self, model: str) -> bool: ...

    def loaded(self) -> list[str]:
        """The models in the server's memory now."""

    def slots(self) -> int | None:
        """How many requests the server runs at once, where it says."""

    def pull(
        self, model: str, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> None: ...

    def describe(self, model: str) -> ModelMeta:
        """What the server says of ``model`` (details, context, capabilities)."""

    def summary_context(self, model: str, configured: int) -> int: ...

    def count_tokens(self, model: str, text: str) -> int | None: ...

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[str] | None = None,
        **answer: Unpack[Answer],
    ) -> Completion:
        """Answer ``prompt`` (after ``system``), which shows ``images`` (base64)."""

    def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], **answer: Unpack[ChatAnswer]
    ) -> Completion:
        """Answer the last of ``messages`` (Ollama's form: base64 ``images`` beside the
        text)."""

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
        """The vectors of ``texts``, in one request to the server."""

    def deadline(self, seconds: float | None) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


def make_backend(settings: WorkerSettings) -> Backend:
    """A new client of the server ``settings`` name; the caller closes it."""
    if settings.backend == "openai":
        assert settings.backend_url is not None  # WorkerSettings refuses openai without one
        return OpenAIClient(
            settings.backend_url,
            api_key=settings.backend_api_key,
            server=settings.backend_server,
            connect_timeout=settings.ollama_connect_timeout_s,
            read_timeout=settings.ollama_read_timeout_s,
        )
    return OllamaClient(
        settings.ollama_url,
        connect_timeout=settings.ollama_connect_timeout_s,
        read_timeout=settings.ollama_read_timeout_s,
        pull_timeout=settings.ollama_pull_timeout_s,
    )


def pull_progress(model: str) -> Callable[[dict[str, Any]], None]:
    """A ``pull`` progress callback that logs each new status of ``model``'s pull once."""
    last: dict[str, str] = {}

    def progress(chunk: dict[str, Any]) -> None:
        status = str(chunk.get("status", ""))
        if status != last.get("status"):
            logger.info("pulling %s: %s", model, status)
            last["status"] = status

    return progress
