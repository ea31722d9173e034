"""The gateway's settings: one class, environment prefix ``AVOCADO_INFER_``; the fleet's own
(broker, Redis, key prefix, default model) are ``avocado_shared.Settings``, prefix ``AVOCADO_``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from avocado_shared.settings import Settings

__all__ = ["InferSettings"]


class InferSettings(BaseSettings):
    """Where the gateway listens, how long it waits for an answer, whom it serves and how
    much."""

    model_config = SettingsConfigDict(
        env_prefix="AVOCADO_INFER_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    host: str = Field(default="127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(default=11435, ge=0, le=65535, description="Port uvicorn binds.")
    stream_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="How long a request waits for the next piece of its answer; the first "
        "piece's wait includes the job's time in the queue.",
    )
    ready_timeout_s: float = Field(
        default=3.0, gt=0, description="How long /readyz waits for the broker and Redis."
    )
    log_level: str = Field(default="info", description="uvicorn's log level.")
    require_keys: bool = Field(
        default=True,
        description="Serve /api, /v1 and /jobs only to requests with an API key of "
        "`avocado keys create` (Authorization: Bearer); false: open to anyone who reaches it.",
    )
    max_queue: int = Field(
        default=100,
        ge=0,
        description="Refuse a new generation (503) while its model's lane queue holds this "
        "many jobs or more, as the broker said at most a second ago; 0: no limit.",
    )
    hold_unserved: bool = Field(
        default=False,
        description="Queue a request for a model no live node serves, for a fleet that brings "
        "nodes up on demand; false: answer 404 at once, with nothing queued.",
    )
    max_body_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest request body read (images make them large): one over it gets a "
        "413 in its API's shape, unread; unset, AVOCADO_MAX_REQUEST_BYTES, the largest job the "
        "fleet publishes.",
    )
    busy_retry_after_s: int = Field(
        default=5,
        ge=1,
        description="Retry-After of a 503: the queue is full, the broker blocks publishing or "
        "cannot be reached.",
    )
    slot_lease_s: float = Field(
        default=30.0,
        ge=1,
        description="A request's hold on one of its key's concurrent slots lasts this long "
        "unless renewed (every third of it while the request runs), so a gateway that dies "
        "frees its slots this much later.",
    )
    files_dir: Path | None = Field(
        default=None,
        description="Where uploaded files (/v1/files, batches' input and output) are kept, "
        "one file and a JSON sidecar each; gateways that share it share their files. Unset: "
        "'files' beside AVOCADO_SQLITE_PATH.",
    )
    max_file_bytes: int = Field(
        default=200 * 1024 * 1024,
        ge=1024,
        description="Largest upload to /v1/files (its whole multipart body), written to disk "
        "as it arrives; one over it gets a 413. OpenAI's own limit for a batch file is 200 MB.",
    )
    batch_window: int = Field(
        default=64,
        ge=1,
        description="Most lines of one batch queued or running at once: its feeder queues "
        "more as they end (and none while the lane's queue is at AVOCADO_INFER_MAX_QUEUE).",
    )
    batch_poll_s: float = Field(
        default=0.2,
        gt=0,
        description="How often a gateway moves on the batches it leases: counts the window's "
        "ended jobs (one query) and fills it again.",
    )
    batch_retention_s: int = Field(
        default=30 * 24 * 3600,
        ge=1,
        description="How long a batch's record is kept once it has ended (completed, failed, "
        "expired or cancelled): its Redis keys expire then and it leaves GET /v1/batches. Its "
        "output and error files are files: they stay until deleted.",
    )
    max_open_batches: int = Field(
        default=10,
        ge=0,
        description="Most batches one API key has open (not yet completed, failed, expired or "
        "cancelled); one more is a 429. 0: no limit.",
    )
    fleet: Settings = Field(
        default_factory=Settings,
        description="The fleet's settings (AVOCADO_*): broker, Redis, key prefix, default model.",
    )

    def files_path(self) -> Path:
        """The directory of uploaded files: ``files_dir``, or ``files`` beside the results'
        SQLite file."""
        return self.files_dir or Path(self.fleet.sqlite_path).parent / "files"
