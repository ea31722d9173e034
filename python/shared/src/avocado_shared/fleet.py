"""The fleet registry: what each running worker serves, kept fresh by the worker itself.

Every worker, announced or not, keeps a record here of the models its server serves (the
lane queues it consumes), which of them are loaded, how many jobs it runs at once, and
whether it drains before a cutoff. The gateway answers a model no live worker serves with a
404 from it and lists the fleet's models from it; ``avocado status`` shows it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import redis
from pydantic import BaseModel, ConfigDict, Field

from avocado_shared.redis_clients import redis_client
from avocado_shared.registry import Records
from avocado_shared.routing import WANTED_MODELS
from avocado_shared.settings import Settings

__all__ = ["ModelMeta", "WorkerRecord", "WorkerRegistry"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ModelMeta(BaseModel):
    """What a node's server says of a model it serves, asked once per model: Ollama's
    ``/api/show``, an OpenAI-compatible server's ``/v1/models`` and llama.cpp's ``/props``.
    The gateway answers ``/api/show`` and ``/v1/models/{id}`` with it; None where the server
    does not say."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: str | None = None
    family: str | None = None
    families: list[str] | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None
    architecture: str | None = None
    parameter_count: int | None = None
    context_length: int | None = Field(default=None, description="Tokens, as its server runs it.")
    embedding_length: int | None = None
    capabilities: list[str] = Field(
        default_factory=list, description="Ollama's words: completion, tools, vision, embedding."
    )
    modified_at: datetime | None = None


class WorkerRecord(BaseModel):
    """One worker as it last said of itself."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    worker: str = Field(min_length=1, max_length=200)
    backend: str = "ollama"
    models: list[str] = Field(default_factory=list, description="Canonical names it consumes.")
    names: dict[str, str] = Field(
        default_factory=dict,
        description="Its server's own name of a model where it is not the canonical one "
        "(``smollm2`` for ``smollm2:latest``): what its clients know it by.",
    )
    loaded: list[str] = Field(default_factory=list, description="Models in its server's memory.")
    meta: dict[str, ModelMeta] = Field(
        default_factory=dict, description="What its server says of each model it serves."
    )
    slots: int = Field(default=1, ge=1, description="Jobs it runs at once.")
    running: int = Field(default=0, ge=0)
    cutoff: datetime | None = Field(default=None, description="When it will be stopped.")
    draining: bool = Field(default=False, description="It takes no new jobs, and leaves.")
    updated_at: datetime = Field(default_factory=_now)
    ttl_s: int = Field(default=30, ge=1)

    def time_left_s(self, now: datetime | None = None) -> float | None:
        """Seconds until the cutoff; None without one."""
        if self.cutoff is None:
            return None
        return max(0.0, (self.cutoff - (now or _now())).total_seconds())

    @property
    def expires_at(self) -> datetime:
        return self.updated_at + timedelta(seconds=self.ttl_s)


class WorkerRegistry(Records[WorkerRecord]):
    """Worker records, ``{prefix}worker:<name>``; an expired one leaves the index when read."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        super().__init__(client, key_prefix, "worker", WorkerRecord)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerRegistry:
        return cls(redis_client(settings), settings.key_prefix)

    def put(self, record: WorkerRecord) -> None:
        """Write or refresh the worker's record; it expires ``ttl_s`` from now."""
        self.put_record(record.worker, record, record.ttl_s)

    def live(self) -> list[WorkerRecord]:
        """Every live record; the index forgets workers whose record expired."""
        read = self._read()
        gone = [member for member, record in read.items() if record is None]
        if gone:
            self.client.hdel(self._index, *gone)
        return [record for record in read.values() if record is not None]

    def wanted(self) -> set[str]:
        """Every model a producer queued jobs for (``routing.WANTED_MODELS``)."""
        raw = self.client.smembers(f"{self.key_prefix}{WANTED_MODELS}")
        return {m.decode() if isinstance(m, bytes) else str(m) for m in raw}

    def served(self) -> set[str]:
        """The canonical names of the models some live worker serves and does not drain."""
        return {model for record in self.live() if not record.draining for model in record.models}
