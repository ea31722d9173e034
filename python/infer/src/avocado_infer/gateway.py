"""What one gateway process holds for its life: the fleet's producer, a Redis client for
token streams and the node registry; made in the app's lifespan, closed there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from avocado_infer.errors import RegistryUnavailable
from avocado_infer.settings import InferSettings
from avocado_shared.contracts import GenerateResult
from avocado_shared.jobs import JobHandle
from avocado_shared.producer import Producer
from avocado_shared.registry import NodeRegistry
from avocado_shared.streams import JobStream
from avocado_shared.tls import redis_ssl, warn_if_plaintext

__all__ = ["Gateway", "ServedModel", "gateway"]


@dataclass(frozen=True)
class ServedModel:
    """A model the fleet serves, and when a node last said so."""

    name: str
    seen_at: datetime


class Gateway:
    """The gateway's long-lived clients; every blocking call runs off the event loop."""

    def __init__(self, settings: InferSettings) -> None:
        self.settings = settings
        fleet = settings.fleet
        url = fleet.redis_url.get_secret_value()
        warn_if_plaintext(url, "Redis")
        self.redis = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, **redis_ssl(fleet, url)
        )
        self.registry = NodeRegistry(self.redis, fleet.key_prefix)
        self.producer = Producer(fleet)
        self.started_at = datetime.now(timezone.utc)

    async def generate(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **fields: Any,
    ) -> JobHandle[GenerateResult]:
        """Publish a generation job; ``InvalidRequest`` before anything is queued."""
        return await run_in_threadpool(self.producer.generate, prompt, messages=messages, **fields)

    def stream(self, job_id: str) -> JobStream:
        """The token stream of ``job_id``."""
        return JobStream(self.redis, self.settings.fleet.key_prefix, job_id)

    async def models(self) -> list[ServedModel]:
        """The models live nodes announce, and the fleet's default model, by name."""
        try:
            nodes = await run_in_threadpool(self.registry.live)
        except redis.RedisError as error:
            raise RegistryUnavailable(f"the node registry is not readable: {error}") from error
        seen = {self.settings.fleet.default_model: self.started_at}
        for node in nodes:
            for name in node.models:
                seen[name] = max(seen.get(name, node.updated_at), node.updated_at)
        return [ServedModel(name, seen[name]) for name in sorted(seen)]

    async def unready(self) -> dict[str, str]:
        """What the gateway cannot reach now (broker, Redis) and why; empty when ready."""
        return await run_in_threadpool(self._unready)

    def _unready(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        timeout = self.settings.ready_timeout_s
        with self.producer.app.connection_for_write() as connection:
            try:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            except Exception as error:  # kombu wraps socket, AMQP and auth errors alike
                problems["broker"] = str(error) or type(error).__name__
        try:
            self.redis.ping()
        except redis.RedisError as error:
            problems["redis"] = str(error) or type(error).__name__
        return problems

    def close(self) -> None:
        """Release the broker and Redis connections."""
        self.producer.close()
        self.redis.close()


def gateway(request: Request) -> Gateway:
    """The app's gateway, as a FastAPI dependency."""
    found: Gateway = request.app.state.gateway
    return found
