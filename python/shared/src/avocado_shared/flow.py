"""Flow control: what a producer does when RabbitMQ blocks publishers.

Under a memory or disk alarm RabbitMQ stops reading from a connection the moment it
publishes and tells it so (``connection.blocked``). A publish then waits for a confirm that
comes only after the alarm clears; the message is already in the socket and will be taken
then, so publishing it again would queue a second copy. py-amqp ignores the reason RabbitMQ
gives and lets the wait run out; here:

- a producer's publish stops at once when its connection is blocked (``BrokerBlocked``), and
  the outcome is reported as unknown, never retried;
- ``FlowGate`` then keeps a connection of its own that RabbitMQ has blocked too, so later
  submissions fail at once without sending anything, until RabbitMQ unblocks it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable

import amqp
from kombu.connection import Connection
from redis.exceptions import RedisError

from avocado_shared.errors import AvocadoError
from avocado_shared.overrides.flow_transport import (
    BrokerBlocked,
    FlowConnection,
    FlowSSLTransport,
    FlowTransport,
)

__all__ = [
    "BrokerBlocked",
    "FlowGate",
    "FlowSSLTransport",
    "FlowTransport",
    "SentUnconfirmed",
    "blocked_reason",
    "causes",
    "flow_transport_path",
    "maybe_sent",
]

logger = logging.getLogger(__name__)

_PROBE_QUEUE = "avocado.flow-probe"  # bound to nothing: the probe is dropped once taken
_PROBE_WAIT_S = 1.0


class SentUnconfirmed(AvocadoError):
    """A job's publish failed after sending it (``maybe_sent``); ``job_id`` is the id it was
    sent under, the one to publish it again with."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} sent, not confirmed")
        self.job_id = job_id


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it was raised from (kombu re-raises py-amqp's errors as its own)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def maybe_sent(error: BaseException) -> bool:
    """Whether a publish that failed with ``error`` may still have queued its message.

    A broker's refusal (a nack, a closed channel: too large, no such exchange) means it was
    not taken; a block, a confirm that did not come in time or a connection lost mid-publish
    leave it unknown: the bytes may be in the broker's socket already. A Redis error comes
    before anything is sent (the job's lock, the result's subscription).
    """
    chain = causes(error)
    refused = (amqp.exceptions.MessageNacked, amqp.exceptions.ChannelError, RedisError)
    if any(isinstance(e, refused) for e in chain):  # Redis: the lock and result come first
        return False
    return any(
        isinstance(e, (BrokerBlocked, OSError, amqp.exceptions.ConnectionError)) for e in chain
    )


def blocked_reason(connection: Connection, wait: float = 0.0) -> str | None:
    """Read what the broker sent on a connection since its last use, sending nothing: a close
    (the broker restarted: raises the connection error), a block or an unblock; ``wait``:
    how long to wait for the first of it. Returns the reason when the broker blocks
    publishing on it."""
    amqp_connection = connection.connection
    if not isinstance(amqp_connection, FlowConnection):
        return None
    sock = amqp_connection.sock
    while sock is not None and select.select([sock], [], [], wait)[0]:
        wait = 0.0
        with contextlib.suppress(TimeoutError):
            amqp_connection.drain_events(timeout=0.01)
    return amqp_connection.blocked_reason


def flow_transport_path(url: str) -> str | None:
    """Celery's ``broker_transport`` for a broker URL: the flow-aware transport for
    ``amqp://`` and ``amqps://`` (``overrides.flow_transport``, named here where flow control
    is), kombu's own choice for anything else."""
    scheme = url.split("://", 1)[0]
    if scheme in ("amqp", "pyamqp"):
        return f"{__name__}:FlowTransport"
    if scheme == "amqps":
        return f"{__name__}:FlowSSLTransport"
    return None


class FlowGate:
    """Whether the broker is blocking this producer, known without publishing a job.

    After a publish met ``connection.blocked``, ``watch`` opens a connection of the gate's own
    and publishes an empty probe to a routing key bound to nothing; RabbitMQ blocks that
    connection as well. ``blocked`` reads it: the reason while RabbitMQ still blocks it,
    None (and the connection closed) once RabbitMQ has sent ``connection.unblocked``.
    """

    def __init__(self, connect: Callable[[], Connection]) -> None:
        """``connect``: a new broker connection without publisher confirms."""
        self._connect = connect
        self._watcher: Connection | None = None
        self._lock = threading.Lock()

    def blocked(self) -> str | None:
        """The broker's reason when it still blocks publishing; None otherwise."""
        if self._watcher is None:
            return None
        with self._lock:
            watcher = self._watcher
            if watcher is None:
                return None
            try:
                reason = blocked_reason(watcher)
            except (OSError, amqp.exceptions.AMQPError) as error:
                logger.warning("flow control watcher lost: %s", error)
                reason = None
            if reason is None:
                self._close()
            return reason

    def watch(self, reason: str) -> None:
        """Start watching after a publish was blocked for ``reason``."""
        with self._lock:
            if self._watcher is not None:
                return
            try:
                watcher = self._connect()
                watcher.ensure_connection(max_retries=1)
                watcher.default_channel.basic_publish(
                    amqp.Message(b""), exchange="", routing_key=_PROBE_QUEUE
                )
                self._watcher = watcher
                deadline = time.monotonic() + _PROBE_WAIT_S
                while blocked_reason(watcher, 0.05) is None and time.monotonic() < deadline:
                    pass
                if watcher.connection.blocked_reason is None:  # the alarm cleared already
                    self._close()
            except (OSError, amqp.exceptions.AMQPError) as error:
                logger.warning("cannot watch the broker's flow control (%s): %s", reason, error)
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.collect()
            self._watcher = None
