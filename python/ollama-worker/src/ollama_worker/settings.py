"""Worker settings: the shared ones plus where Ollama is and how to treat it."""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator

from avocado_shared.settings import Settings

__all__ = ["WorkerSettings"]


class WorkerSettings(Settings):
    """Everything an Ollama worker reads from ``AVOCADO_*`` variables or ``.env``."""

    backend: Literal["ollama", "openai"] = Field(
        default="ollama",
        description="The inference server's API: Ollama's native one, or OpenAI-compatible "
        "(vLLM, llama.cpp's server, LM Studio, SGLang, TGI, Ollama's /v1).",
    )
    backend_url: str | None = Field(
        default=None,
        description="Base URL of the OpenAI-compatible server, ending in /v1; "
        "Ollama's address stays AVOCADO_OLLAMA_URL.",
    )
    backend_api_key: SecretStr | None = Field(
        default=None, description="Sent to the OpenAI-compatible server as a Bearer token."
    )
    backend_server: Literal["standard", "llama-cpp-python"] = Field(
        default="standard",
        description="Which OpenAI-compatible server: standard takes OpenAI's own forms (vLLM, "
        "llama.cpp's llama-server, LM Studio, SGLang, Ollama's /v1); llama-cpp-python (the "
        "embedded default's) takes a JSON schema only inside json_object, and answers 500 to "
        "a request it cannot handle, which then fails at once instead of being retried.",
    )
    ollama_url: str = "http://127.0.0.1:11434"
    ollama_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Connect timeout to the inference server, either API."
    )
    ollama_read_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest silence between two streamed chunks, either API.",
    )
    ollama_pull_timeout_s: float = Field(default=1800.0, gt=0)
    allow_pull: bool = Field(default=True, description="Pull a missing model on demand.")
    summary_num_ctx: int = Field(
        default=4096, ge=512, description="Context window used for summaries, in tokens."
    )
    retry_max: int = Field(default=5, ge=0, description="Retries of a transient failure.")
    job_lease_s: int = Field(
        default=10,
        ge=3,
        description="A running job's lease on its id, refreshed every third of it: a copy of "
        "the job waits, and a dead worker's job is redelivered at most this much later.",
    )
    retry_backoff_max_s: int = Field(default=60, ge=1)
    stream_ttl_s: int = Field(
        default=3600,
        ge=60,
        description="A job's token stream in Redis lives this long after its first and its "
        "last chunk, for readers that come late and for a redelivered job to continue it.",
    )
    stream_resume: Literal["continue", "restart"] = Field(
        default="continue",
        description="A redelivered job whose stream holds part of an answer: continue that text "
        "on the server (a trailing assistant message: Ollama, vLLM, SGLang, TGI, llama.cpp's "
        "llama-server), or, for a server that cannot (llama-cpp-python's), mark the stream "
        "restarted and answer anew.",
    )
    worker_id: str = Field(default_factory=socket.gethostname)
    slots: int | None = Field(
        default=None,
        ge=1,
        description="Jobs this node runs at once when --concurrency does not say: unset, what "
        "the server says (llama.cpp's slots; OLLAMA_NUM_PARALLEL of an `ollama serve` the "
        "worker started), else 4 (Ollama's own default where memory allows).",
    )
    worker_pool: Literal["prefork", "threads"] = Field(
        default="threads",
        description="Celery pool of the worker (Celery lets this setting override even an "
        "explicit --pool prefork); BENCHMARKS.md gives the reasons for the default.",
    )

    # The node's public endpoint: an ngrok tunnel, or an address it already has.
    tunnel: bool = Field(
        default=False, description="Expose Ollama through an ngrok tunnel and announce it."
    )
    public_url: str | None = Field(
        default=None, description="Announce this URL (a host with a public address), no tunnel."
    )
    service_id: str = Field(
        default_factory=socket.gethostname, description="This node's id in the registry."
    )
    ngrok_authtoken: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("NGROK_AUTHTOKEN", "AVOCADO_NGROK_AUTHTOKEN")
    )
    ngrok_path: str | None = Field(
        default=None, description="A pre-installed ngrok binary; pyngrok installs one otherwise."
    )
    ngrok_domain: str | None = Field(default=None, description="A reserved ngrok domain.")
    tunnel_user: str = Field(default="avocado", min_length=1)
    tunnel_password: SecretStr | None = Field(
        default=None, description="Basic auth password of the tunnel, 8 to 128 characters."
    )
    node_ttl_s: int = Field(default=30, ge=2, description="A node record lives this long.")
    node_refresh_s: float = Field(
        default=10.0, gt=0, description="How often a node checks its endpoint and refreshes."
    )
    announce_interval_s: float = Field(
        default=15.0, gt=0, description="Beat re-announces every live endpoint this often."
    )
    max_models: int | None = Field(
        default=None,
        ge=1,
        description="Models this node takes jobs of at once: those its server holds in memory "
        "together. Unset: 1 on Ollama (a notebook's GPU), every model it serves on an "
        "OpenAI-compatible server.",
    )
    max_embedding_models: int | None = Field(
        default=None,
        ge=0,
        description="Embedding models this node takes jobs of at once, besides max_models: "
        "small ones stay loaded beside a chat model. Unset: 1 on Ollama, every one it serves "
        "on an OpenAI-compatible server.",
    )
    embedding_models: list[str] = Field(
        default_factory=list,
        description="Models to count as embedding models whatever the server says (a JSON "
        "list); Ollama says so itself (its /api/show capabilities).",
    )
    embed_batch_size: int = Field(
        default=64,
        ge=1,
        description="Texts an embedding job sends its server in one request; a longer list "
        "goes in several.",
    )
    cutoff: datetime | None = Field(
        default=None,
        description="When this node will be stopped (ISO 8601, with a time zone): it drains "
        "before, taking no job it could not finish by then.",
    )
    cutoff_after_s: float | None = Field(
        default=None,
        gt=0,
        description="The same, as seconds after the worker starts; `avocado-worker up` sets it "
        "from a notebook's session limit (Colab, Kaggle: 12 h from the machine's boot).",
    )
    drain_margin_s: float = Field(
        default=30.0,
        ge=0,
        description="A draining node leaves this long before its cutoff at the latest.",
    )
    models_refresh_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the worker asks its server which models it serves, and follows "
        "them with the lane queues it consumes.",
    )

    # Prometheus metrics of the jobs, served by the worker's main process.
    metrics_port: int | None = Field(
        default=9808, ge=0, le=65535, description="/metrics on this port; 0 turns it off."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address /metrics listens on: loopback unless a scraper needs it, since "
        "it tells anyone who asks which models run here and how busy they are.",
    )

    @property
    def server_url(self) -> str:
        """The inference server's address, whichever API it speaks."""
        if self.backend == "openai" and self.backend_url:
            return self.backend_url
        return self.ollama_url

    @model_validator(mode="after")
    def _backend_settings(self) -> WorkerSettings:
        """An OpenAI-compatible backend has no default address; a URL for none is a typo."""
        if self.backend == "openai" and not self.backend_url:
            raise ValueError("AVOCADO_BACKEND=openai needs AVOCADO_BACKEND_URL (.../v1)")
        if self.backend == "ollama" and self.backend_url:
            raise ValueError(
                "AVOCADO_BACKEND_URL is for AVOCADO_BACKEND=openai; "
                "Ollama's address is AVOCADO_OLLAMA_URL"
            )
        return self

    @model_validator(mode="after")
    def _endpoint_settings(self) -> WorkerSettings:
        """Refuse at start what would make a node announce an endpoint it cannot keep."""
        if self.node_refresh_s >= self.node_ttl_s:
            raise ValueError(
                f"node_refresh_s {self.node_refresh_s} must be below node_ttl_s "
                f"{self.node_ttl_s}, or a live node's record expires between refreshes"
            )
        password = self.tunnel_password.get_secret_value() if self.tunnel_password else ""
        if self.tunnel and not 8 <= len(password) <= 128:
            raise ValueError(
                "AVOCADO_TUNNEL needs AVOCADO_TUNNEL_PASSWORD (8 to 128 characters): "
                "an open tunnel would give the internet your Ollama"
            )
        return self
