"""The one place the settings pick the inference client: Ollama's or an OpenAI-compatible."""

from __future__ import annotations

from ollama_worker.ollama import OllamaClient
from ollama_worker.openai_api import OpenAIClient
from ollama_worker.settings import WorkerSettings

__all__ = ["Backend", "make_backend"]

Backend = OllamaClient | OpenAIClient
"""The inference clients the settings choose between."""


def make_backend(settings: WorkerSettings) -> Backend:
    """A new client of the server ``settings`` name; the caller closes it."""
    if settings.backend == "openai":
        assert settings.backend_url is not None  # WorkerSettings refuses openai without one
        return OpenAIClient(
            settings.backend_url,
            api_key=settings.backend_api_key,
            connect_timeout=settings.ollama_connect_timeout_s,
            read_timeout=settings.ollama_read_timeout_s,
        )
    return OllamaClient(
        settings.ollama_url,
        connect_timeout=settings.ollama_connect_timeout_s,
        read_timeout=settings.ollama_read_timeout_s,
        pull_timeout=settings.ollama_pull_timeout_s,
    )
