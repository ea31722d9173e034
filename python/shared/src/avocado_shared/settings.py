"""Settings every part of the fleet reads: one class, environment prefix ``AVOCADO_``."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


class Settings(BaseSettings):
    """Broker, Redis and job policy shared by producers and workers.

    Secrets are ``SecretStr`` so they never appear in a repr, a log line or an announcement.
    """

    model_config = SettingsConfigDict(
        env_prefix="AVOCADO_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    broker_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672//")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    result_backend_url: SecretStr | None = Field(
        default=None, description="Celery result backend; the Redis URL when unset."
    )
    tls_ca_file: FilePath | None = Field(
        default=None,
        description="CA certificates (PEM) that the broker's and Redis's certificates must "
        "chain to over amqps:// and rediss://; the system's CAs when unset.",
    )
    tls_cert_file: FilePath | None = Field(
        default=None,
        description="Client certificate (PEM) shown to the broker and Redis over TLS, for "
        "servers that require one; may hold its key too.",
    )
    tls_key_file: FilePath | None = Field(
        default=None, description="The client certificate's private key (PEM), if apart."
    )
    key_prefix: str = Field(
        default="avocado:", description="Prefix of every Redis key we write, for isolation."
    )
    declare_topology: bool = Field(
        default=True,
        description="Declare the exchanges and queues before use; off for a least-privilege "
        "user (avocado admin create-worker), which may not: declaring a queue takes the "
        "permission that deletes it.",
    )
    rabbitmq_management_url: SecretStr | None = Field(
        default=None,
        description="RabbitMQ's management API for avocado admin, http://user:password@host:15672;"
        " unset: the broker's host on port 15672 with the broker URL's user.",
    )
    default_model: str = "llama3.2:1b"
    embed_model: str = Field(
        default="all-minilm",
        description="The model an embedding job uses when it names none (Ollama's name for "
        "all-MiniLM-L6-v2, which the embedded default serves too).",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="ml_results database: postgresql://... in deployment; SQLite file when unset.",
    )
    sqlite_path: str = Field(
        default_factory=lambda: str(_data_home() / "avocado" / "results.sqlite3"),
        description="The SQLite file used when no URL is set; one per machine by default, so "
        "the workers and the CLI on it read the same results.",
    )
    gateway_url: str = Field(
        default="http://127.0.0.1:11435",
        description="The HTTP gateway (avocado-infer) that `avocado batch` talks to.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The gateway's API key `avocado batch` sends (from the environment, never "
        "the command line); none when the gateway asks for none.",
    )
    lock_expiry_s: int = Field(
        default=3600, ge=60, description="Singleton locks expire on their own after this."
    )

    delivery_limit: int = Field(
        default=5, ge=1, description="Deliveries of one message before it is dead-lettered."
    )
    consumer_timeout_s: int = Field(
        default=1800, ge=60, description="RabbitMQ's consumer_timeout; job limits stay below it."
    )
    generate_soft_time_limit_s: int = Field(default=600, ge=1)
    generate_time_limit_s: int = Field(default=660, ge=1)
    summarize_soft_time_limit_s: int = Field(default=1200, ge=1)
    summarize_time_limit_s: int = Field(default=1260, ge=1)
    embed_soft_time_limit_s: int = Field(default=600, ge=1)
    embed_time_limit_s: int = Field(default=660, ge=1)
    result_expires_s: int = Field(default=7 * 24 * 3600, ge=60)
    task_events: bool = Field(
        default=False,
        description="Publish Celery task events for every job; Flower enables them in the "
        "workers it watches, so only monitors other than Flower need this.",
    )
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a publish may wait for the broker's confirm."
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=64 * 1024,
        le=15 * 1024 * 1024,
        description="Largest job a producer publishes, as JSON: RabbitMQ refuses messages over "
        "its max_message_size (16 MiB by default on 4.x), headers included.",
    )

    @model_validator(mode="after")
    def _limits_below_consumer_timeout(self) -> Settings:
        """A job must end before RabbitMQ closes the channel that holds its unacked message."""
        pairs = {
            "generate": (self.generate_soft_time_limit_s, self.generate_time_limit_s),
            "summarize": (self.summarize_soft_time_limit_s, self.summarize_time_limit_s),
            "embed": (self.embed_soft_time_limit_s, self.embed_time_limit_s),
        }
        for kind, (soft, hard) in pairs.items():
            if soft >= hard:
                raise ValueError(f"{kind}: soft time limit {soft}s must be below hard {hard}s")
            if hard >= self.consumer_timeout_s:
                raise ValueError(
                    f"{kind}: time limit {hard}s must be below RabbitMQ's consumer_timeout "
                    f"{self.consumer_timeout_s}s, or the broker closes the channel mid-job"
                )
        return self

    @model_validator(mode="after")
    def _tls_settings(self) -> Settings:
        """Refuse at start a key without its certificate, and broker URLs that mix TLS and
        plaintext (one set of TLS options serves every URL of the list)."""
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("AVOCADO_TLS_KEY_FILE needs AVOCADO_TLS_CERT_FILE, its certificate")
        schemes = {url.partition("://")[0] for url in self.broker_urls}
        if len(schemes) > 1:
            raise ValueError(f"the broker URLs mix schemes {sorted(schemes)}: use amqps:// for all")
        return self

    @property
    def broker_urls(self) -> list[str]:
        """The ``;``-separated broker URLs, each on its own (producers fail over through them)."""
        return [url for url in self.broker_url.get_secret_value().split(";") if url]

    @property
    def result_backend(self) -> str:
        """The Celery result backend URL (Redis unless set otherwise)."""
        url = self.result_backend_url or self.redis_url
        return url.get_secret_value()
