"""kombu's py-amqp transport on a connection that keeps why RabbitMQ blocked it.

py-amqp 5.4 reads ``connection.blocked`` without its reason argument and lets a publish wait
out its confirm; ``avocado_shared.flow`` needs the reason, and a publish that stops at once.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from amqp import spec
from kombu.transport import pyamqp

from avocado_shared.errors import TransientError

__all__ = ["BrokerBlocked", "FlowConnection", "FlowSSLTransport", "FlowTransport"]

logger = logging.getLogger(__name__)


class BrokerBlocked(TransientError):  # not an OSError: kombu would rewrap it, reason lost
    """RabbitMQ blocked this connection's publishing; ``reason`` is the broker's words."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the broker blocks publishing ({reason})")
        self.reason = reason


class FlowConnection(pyamqp.Connection):
    """py-amqp's connection, keeping the reason of ``connection.blocked`` (py-amqp drops the
    argument) and, while ``abort_on_blocked`` is set, raising ``BrokerBlocked`` from the
    wait the notice arrives in."""

    _METHODS: ClassVar[dict[Any, Any]] = {
        **pyamqp.Connection._METHODS,
        spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.blocked_reason: str | None = None
        self.abort_on_blocked = False
        super().__init__(*args, **kwargs)

    def _on_blocked(self, reason: str = "") -> None:
        self.blocked_reason = reason or "no reason given"
        # Info: a producer raises it to its caller; a worker's publishes wait it out.
        logger.info("RabbitMQ blocks publishing on this connection: %s", self.blocked_reason)
        if self.abort_on_blocked:
            raise BrokerBlocked(self.blocked_reason)

    def _on_unblocked(self) -> None:
        self.blocked_reason = None
        logger.info("RabbitMQ unblocked publishing on this connection")


class FlowTransport(pyamqp.Transport):
    """kombu's ``amqp://`` transport on ``FlowConnection``."""

    Connection = FlowConnection


class FlowSSLTransport(pyamqp.SSLTransport):
    """kombu's ``amqps://`` transport on ``FlowConnection``."""

    Connection = FlowConnection
