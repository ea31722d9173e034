"""RabbitMQ topology of the fleet, declared in one place for producers, workers and consumers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from avocado_shared.redeclare import broker_major, redeclare
from avocado_shared.routing import Lane, lane_queue_name
from avocado_shared.settings import Settings

__all__ = [
    "ANNOUNCE_QUEUE",
    "ANNOUNCE_TASK",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DISCOVERY_EXCHANGE",
    "EMBED_QUEUE",
    "EMBED_TASK",
    "GENERATE_QUEUE",
    "GENERATE_TASK",
    "INFRA_EXCHANGE",
    "JOB_TASKS",
    "ML_EXCHANGE",
    "SUMMARIZE_QUEUE",
    "SUMMARIZE_TASK",
    "URL_CHANGED",
    "URL_REMOVED",
    "QueueInfo",
    "dead_letter_queue",
    "declare_dead_letter_queue",
    "declare_delayed_delivery",
    "declare_lane_queues",
    "declare_topology",
    "describe",
    "job_queue",
    "job_queues",
    "lane_queues",
    "listener_queue",
    "task_routes",
]

ML_EXCHANGE = Exchange("ml", type="topic", durable=True)
INFRA_EXCHANGE = Exchange("infra", type="topic", durable=True)
DEAD_LETTER_EXCHANGE = Exchange("ml.dlx", type="topic", durable=True)
DISCOVERY_EXCHANGE = Exchange("service-discovery", type="topic", durable=True)

GENERATE_QUEUE = "ml.generate"
SUMMARIZE_QUEUE = "ml.summarize"
EMBED_QUEUE = "ml.embed"
ANNOUNCE_QUEUE = "infra.announce"
DEAD_LETTER_QUEUE = "ml.dead-letter"

GENERATE_TASK = "avocado.generate"
SUMMARIZE_TASK = "avocado.summarize"
EMBED_TASK = "avocado.embed"
ANNOUNCE_TASK = "avocado.announce"
# The tasks that run a model: each locked on its identity and run once per job id.
JOB_TASKS = (GENERATE_TASK, SUMMARIZE_TASK, EMBED_TASK)

URL_CHANGED = "inference.url.changed"
URL_REMOVED = "inference.url.removed"

_ROUTES = {
    GENERATE_TASK: GENERATE_QUEUE,
    SUMMARIZE_TASK: SUMMARIZE_QUEUE,
    EMBED_TASK: EMBED_QUEUE,
    ANNOUNCE_TASK: ANNOUNCE_QUEUE,
}


def listener_queue(name: str, exchange: Exchange, routing_key: str) -> Queue:
    """A queue of one process's own on ``exchange`` (a watcher of announcements, of dead
    letters): not durable, exclusive to its connection and deleted with it; classic, as an
    exclusive queue can never be a quorum queue, whatever the vhost's default type."""
    return Queue(
        name,
        exchange,
        routing_key=routing_key,
        durable=False,
        exclusive=True,
        auto_delete=True,
        queue_arguments={"x-queue-type": "classic"},
    )


def job_queue(name: str, exchange: Exchange, settings: Settings) -> Queue:
    """A quorum queue that dead-letters a message once it was delivered too often, at least
    once: RabbitMQ's default for quorum queues (at most once) drops a letter whose move is
    cut short, by a leader change say; at least once keeps it until ``ml.dead-letter``
    confirmed it, and needs ``reject-publish`` overflow."""
    return Queue(
        name,
        exchange,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def job_queues(settings: Settings) -> tuple[Queue, ...]:
    """The queues every worker consumes: ``ml.generate``, ``ml.summarize`` and ``ml.embed``
    take jobs published without a model queue (plain AMQP, earlier releases) and the worker
    forwards each to its model's lane queue; ``infra.announce`` takes beat's job."""
    return (
        job_queue(GENERATE_QUEUE, ML_EXCHANGE, settings),
        job_queue(SUMMARIZE_QUEUE, ML_EXCHANGE, settings),
        job_queue(EMBED_QUEUE, ML_EXCHANGE, settings),
        job_queue(ANNOUNCE_QUEUE, INFRA_EXCHANGE, settings),
    )


# ``ml`` as the lane queues name it: declared with the topology, never by declaring a lane
# queue, which a least-privilege worker may do where it may not declare the exchange.
_DECLARED_ML = Exchange(ML_EXCHANGE.name, type="topic", durable=True, no_declare=True)


def lane_queues(model: str, settings: Settings) -> tuple[Queue, ...]:
    """The queues of ``model``'s lanes, interactive first, on the ``ml`` exchange."""
    return tuple(job_queue(lane_queue_name(model, lane), _DECLARED_ML, settings) for lane in Lane)


def declare_lane_queues(connection: Connection, model: str, settings: Settings) -> list[Queue]:
    """Declare ``model``'s lane queues (a job for a model no node serves yet waits in them),
    migrating one declared with other arguments."""
    queues = list(lane_queues(model, settings))
    for queue in queues:
        redeclare(connection, queue)
    return queues


def dead_letter_queue(major: int) -> Queue:
    """Keeps every dead-lettered job, whatever its routing key, for inspection and replay, on
    a RabbitMQ of version ``major``.

    With no delivery limit: reading a letter hands it back, which counts as a delivery, and
    a letter must never be dropped for having been read. RabbitMQ 4 gives quorum queues a
    limit of 20 unless told -1; RabbitMQ 3 has none by default, and drops every message at
    once when told -1.
    """
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if major >= 4:
        arguments["x-delivery-limit"] = -1
    return Queue(
        DEAD_LETTER_QUEUE,
        DEAD_LETTER_EXCHANGE,
        routing_key="#",
        durable=True,
        queue_arguments=arguments,
    )


def declare_dead_letter_queue(connection: Connection) -> Queue:
    """Declare ``ml.dead-letter`` for this broker's version, migrating one declared otherwise
    (by an older release, or before the broker was upgraded) with every letter it holds."""
    queue = dead_letter_queue(broker_major(connection))
    redeclare(connection, queue)
    return queue


def task_routes() -> dict[str, dict[str, str]]:
    """Celery ``task_routes``: each task name to its queue."""
    return {task: {"queue": queue} for task, queue in _ROUTES.items()}


def declare_topology(connection: Connection, settings: Settings) -> list[Queue]:
    """Declare exchanges, queues and bindings; idempotent, safe on every start."""
    DISCOVERY_EXCHANGE(connection.default_channel).declare()
    queues = list(job_queues(settings))
    for queue in queues:
        redeclare(connection, queue)  # those of a release before at-least-once migrate
    return [*queues, declare_dead_letter_queue(connection)]


def declare_delayed_delivery(connection: Connection, queues: Iterable[Queue]) -> None:
    """Celery's native delayed delivery, where a retry with a countdown waits on quorum queues:
    its 28 exchanges and queues, and each of ``queues`` bound to its last exchange."""
    declare_native_delayed_delivery_exchanges_and_queues(connection, "quorum")
    for queue in queues:
        bind_queue_to_native_delayed_delivery_exchange(connection, queue)


@dataclass(frozen=True)
class QueueInfo:
    """What ``avocado topology`` shows of one queue."""

    name: str
    exchange: str
    routing_key: str
    arguments: dict[str, Any]
    messages: int
    consumers: int


def describe(
    connection: Connection, settings: Settings, models: Iterable[str] = ()
) -> list[QueueInfo]:
    """Declare the topology (and the lane queues of ``models``) and report each queue's depth
    and consumer count."""
    infos = []
    queues = declare_topology(connection, settings)
    for model in models:
        queues.extend(declare_lane_queues(connection, model, settings))
    for queue in queues:
        bound = queue(connection.default_channel)
        _, messages, consumers = bound.queue_declare(passive=True)
        infos.append(
            QueueInfo(
                name=queue.name,
                exchange=queue.exchange.name,
                routing_key=queue.routing_key,
                arguments=dict(getattr(queue, "queue_arguments", None) or {}),
                messages=messages,
                consumers=consumers,
            )
        )
    return infos
