"""Celery's native delayed delivery (retries with a countdown, on quorum queues) set up on the
broker the worker's consumer is connected to.

Celery 5.7's own step sets it up on every URL of a failover list (``amqp://a;amqp://b``) at
each consumer start, and tries each URL it cannot reach four times with growing pauses: when
a node of a cluster died, every worker stalled about 17 s before it consumed again. A cluster
shares its exchanges and queues, and after a failover the consumer starts again on the broker
it moved to, so the live one is enough.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery as CeleryDelayedDelivery

from avocado_shared.topology import declare_delayed_delivery

__all__ = ["DelayedDelivery"]


class DelayedDelivery(CeleryDelayedDelivery):  # type: ignore[misc]
    """Celery's step (after the same step, included where it would be), declaring on the
    consumer's broker only; in place of Celery's, which ``overrides.consumer`` leaves out."""

    def start(self, c: Consumer) -> None:
        # A connection of its own to the same broker: its channels close with it.
        with c.connection.clone() as connection:
            declare_delayed_delivery(connection, c.app.amqp.queues.values())
