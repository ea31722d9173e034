"""Where the fleet's Ollama endpoints are: the announcement on ``service-discovery`` and a
consumer that keeps a live map of them.

A worker host that exposes its Ollama (through an ngrok tunnel, or a public address)
announces it with routing key ``inference.url.changed``, and ``inference.url.removed`` when
it goes. An announcement says what a caller needs to reach the endpoint (URL, auth scheme,
headers to send) and never a secret: callers get credentials out of band.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Literal

from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.message import Message
from kombu.messaging import Consumer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from avocado_shared.topology import (
    DISCOVERY_EXCHANGE,
    URL_CHANGED,
    URL_REMOVED,
    listener_queue,
)

__all__ = [
    "Announcement",
    "Endpoint",
    "EndpointEvent",
    "EndpointWatcher",
    "publish_announcement",
]

logger = logging.getLogger(__name__)

# Checked, not declared, by publishers: the worker or the admin declared it, and a
# least-privilege worker may not (declaring takes the permission that deletes).
_DISCOVERY_EXISTS = Exchange(DISCOVERY_EXCHANGE.name, "topic", durable=True, passive=True)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class EndpointEvent(str, Enum):
    """What an announcement says happened; also the last word of its routing key."""

    CHANGED = "changed"
    REMOVED = "removed"

    @property
    def routing_key(self) -> str:
        """``inference.url.changed`` or ``inference.url.removed``."""
        return URL_CHANGED if self is EndpointEvent.CHANGED else URL_REMOVED


class Endpoint(BaseModel):
    """One node's public inference endpoint, as the registry holds it and announcements carry it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    service_id: str = Field(min_length=1, max_length=200)
    url: str = Field(pattern=r"^https?://\S+$")
    auth: Literal["basic", "bearer", "none"] = "basic"
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers a caller must send, never credentials."
    )
    backend: Literal["ollama", "openai"] = Field(
        default="ollama",
        description="The API behind the URL: Ollama's, or OpenAI-compatible under /v1; "
        "announcements from before this field are Ollama's.",
    )
    models: list[str] = Field(default_factory=list)
    version: str | None = Field(
        default=None, description="The Ollama version behind the URL; None for openai."
    )
    worker: str | None = None
    started_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    ttl_s: int = Field(default=30, ge=1)

    @property
    def expires_at(self) -> datetime:
        """When the record is gone unless its node refreshes it."""
        return self.updated_at + timedelta(seconds=self.ttl_s)

    def alive(self, now: datetime | None = None) -> bool:
        """True until ``expires_at``."""
        return (now or _now()) < self.expires_at


class Announcement(Endpoint):
    """The JSON body published on ``service-discovery``: the endpoint and what happened."""

    event: EndpointEvent
    sent_at: datetime = Field(default_factory=_now)

    @classmethod
    def of(cls, endpoint: Endpoint, event: EndpointEvent) -> Announcement:
        """The announcement of ``event`` for ``endpoint``."""
        return cls(**endpoint.model_dump(), event=event)


def publish_announcement(
    connection: Connection, endpoint: Endpoint, event: EndpointEvent, timeout: float = 10.0
) -> Announcement:
    """Publish persistent and publisher-confirmed (the connection must ask for confirms, as
    the fleet's Celery connections do); raises when the broker did not take it."""
    announcement = Announcement.of(endpoint, event)
    producer = connection.Producer()
    producer.publish(
        announcement.model_dump_json(),
        exchange=DISCOVERY_EXCHANGE,
        routing_key=event.routing_key,
        declare=[_DISCOVERY_EXISTS],
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        timeout=timeout,
    )
    return announcement


class EndpointWatcher:
    """A live map of announced endpoints, fed by a queue of its own bound to
    ``service-discovery``; an endpoint leaves the map when removed or when its TTL passes.

    The queue is exclusive and deleted with the connection: a watcher learns what was
    announced before it started from the next periodic re-announce.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        binding: str = "inference.url.#",
        on_event: Callable[[Announcement], None] | None = None,
    ) -> None:
        self.connection = connection
        self.queue = listener_queue(
            f"discovery.{socket.gethostname()}.{uuid.uuid4().hex[:8]}", DISCOVERY_EXCHANGE, binding
        )
        self._on_event = on_event
        self._endpoints: dict[str, Endpoint] = {}
        self._consumer: Consumer | None = None

    def __enter__(self) -> EndpointWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> EndpointWatcher:
        """Declare and bind the queue and start consuming."""
        self._consumer = Consumer(
            self.connection.channel(),
            queues=[self.queue],
            callbacks=[self._receive],
            accept=["json"],
        )
        self._consumer.consume()
        return self

    def stop(self) -> None:
        """Stop consuming; the queue goes with the channel."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.cancel()
            if consumer.channel is not None:
                consumer.channel.close()

    def drain(self, timeout: float) -> None:
        """Handle the announcements that arrive within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.connection.drain_events(timeout=left)
            except TimeoutError:
                return

    def wait_until(self, condition: Callable[[dict[str, Endpoint]], bool], timeout: float) -> bool:
        """Drain until ``condition(live endpoints)`` holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not condition(self.live()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.drain(min(left, 0.5))
        return True

    def live(self) -> dict[str, Endpoint]:
        """The endpoints announced and neither removed nor expired, by service id."""
        now = _now()
        for service_id in [k for k, e in self._endpoints.items() if not e.alive(now)]:
            del self._endpoints[service_id]
        return dict(self._endpoints)

    def _receive(self, body: Any, message: Message) -> None:
        try:
            announcement = Announcement.model_validate(body)
        except ValidationError as error:
            logger.warning("ignored an announcement that is not one: %s", error)
            message.ack()
            return
        current = self._endpoints.get(announcement.service_id)
        if current is not None and current.updated_at > announcement.updated_at:
            message.ack()  # an older re-announce arriving late
            return
        if announcement.event is EndpointEvent.REMOVED:
            if current is None or current.url == announcement.url:
                self._endpoints.pop(announcement.service_id, None)
        else:
            self._endpoints[announcement.service_id] = Endpoint(
                **announcement.model_dump(exclude={"event", "sent_at"})
            )
        message.ack()
        if self._on_event is not None:
            self._on_event(announcement)
