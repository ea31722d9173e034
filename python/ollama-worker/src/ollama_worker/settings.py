"""Worker settings: the shared ones plus where Ollama is and how to treat it."""

from __future__ import annotations

import socket

from pydantic import Field

from avocado_shared.settings import Settings

__all__ = ["WorkerSettings"]


class WorkerSettings(Settings):
    """Everything an Ollama worker reads from ``AVOCADO_*`` variables or ``.env``."""

    ollama_url: str = "http://127.0.0.1:11434"
    ollama_connect_timeout_s: float = Field(default=5.0, gt=0)
    ollama_read_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest silence between two streamed chunks."
    )
    ollama_pull_timeout_s: float = Field(default=1800.0, gt=0)
    allow_pull: bool = Field(default=True, description="Pull a missing model on demand.")
    summary_num_ctx: int = Field(
        default=4096, ge=512, description="Context window used for summaries, in tokens."
    )
    retry_max: int = Field(default=5, ge=0, description="Retries of a transient failure.")
    retry_backoff_max_s: int = Field(default=60, ge=1)
    worker_id: str = Field(default_factory=socket.gethostname)
