"""Redeclaring a queue whose arguments changed, without losing a message it holds.

RabbitMQ refuses to redeclare a queue with other arguments (406 PRECONDITION_FAILED), and
deleting it would drop what it holds. So its messages move, in order, through a holding queue
that takes new messages meanwhile, and come back once the queue has its new arguments. Every
move is publish-confirmed before the original is acknowledged: a crash at any point leaves each
message in one of the two queues (at worst in both), never in neither, and the next declare
finishes the job.
"""

from __future__ import annotations

import logging
from typing import Any

from amqp.exceptions import NotFound, PreconditionFailed
from kombu.connection import Connection
from kombu.entity import Queue

__all__ = ["HOLDING_SUFFIX", "broker_major", "raw_body", "redeclare"]

logger = logging.getLogger(__name__)

HOLDING_SUFFIX = ".migrating"
# Set by the broker on each delivery; a copy must not carry the old queue's count.
_BROKER_HEADERS = ("x-delivery-count",)


def broker_major(connection: Connection) -> int:
    """The major version of the RabbitMQ ``connection`` is connected to (3 when it says none)."""
    version = (connection.connection.server_properties or {}).get("version") or b"3"
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else 3


def raw_body(message: Any) -> bytes:
    """A received message's body as the bytes that were published.

    py-amqp hands over a body as ``str`` when its ``content_encoding`` decodes it.
    """
    body = message.body
    if isinstance(body, str):
        return body.encode(message.content_encoding or "utf-8")
    return bytes(body)


def redeclare(connection: Connection, queue: Queue) -> None:
    """Declare ``queue`` and its binding; an existing one with other arguments is migrated,
    and one a migration left half done is finished."""
    holding = _holding(queue)
    channel = connection.channel()
    try:
        queue(channel).declare()
    except PreconditionFailed as error:
        logger.warning("%s has other arguments than %s: migrating it", queue.name, error)
        _migrate(connection, queue, holding)
        return
    finally:
        _close(channel)
    if _exists(connection, holding.name):
        logger.warning("finishing the migration of %s from %s", queue.name, holding.name)
        _drain_into(connection, holding, queue)


def _holding(queue: Queue) -> Queue:
    """Where ``queue``'s messages wait while it is declared anew: same arguments, same binding."""
    return Queue(
        f"{queue.name}{HOLDING_SUFFIX}",
        queue.exchange,
        routing_key=queue.routing_key,
        durable=True,
        queue_arguments=dict(getattr(queue, "queue_arguments", None) or {}),
    )


def _migrate(connection: Connection, queue: Queue, holding: Queue) -> None:
    channel = connection.channel()
    try:
        holding(channel).declare()  # bound: new messages land here from now on
        channel.queue_unbind(queue.name, queue.exchange.name, queue.routing_key)
        moved = _empty_into(channel, queue.name, holding.name)
        channel.queue_delete(queue.name)
        queue(channel).declare()
    finally:
        _close(channel)
    logger.warning("moved %d message(s) of %s aside while it was redeclared", moved, queue.name)
    _drain_into(connection, holding, queue)


def _drain_into(connection: Connection, holding: Queue, queue: Queue) -> None:
    """Move everything from ``holding`` back into ``queue`` (already declared), then drop it."""
    channel = connection.channel()
    try:
        channel.queue_unbind(holding.name, holding.exchange.name, holding.routing_key)
        moved = _empty_into(channel, holding.name, queue.name)
        channel.queue_delete(holding.name)
    finally:
        _close(channel)
    logger.warning("%s redeclared with its new arguments, %d message(s) kept", queue.name, moved)


def _empty_into(channel: Any, source: str, target: str) -> int:
    """Move ``source``'s messages to ``target`` until ``source`` is empty, so that deleting
    it drops nothing: quorum queues refuse ``if_empty`` deletes (and close the connection)."""
    moved = _move(channel, source, target)
    while _depth(channel, source):  # a message came in during the move: move it too
        moved += _move(channel, source, target)
    return moved


def _move(channel: Any, source: str, target: str) -> int:
    """Move every message of ``source`` to the end of ``target``, in order, one at a time."""
    moved = 0
    while (message := channel.basic_get(source, no_ack=False)) is not None:
        properties = dict(message.properties)
        headers = {
            k: v
            for k, v in (properties.pop("application_headers", None) or {}).items()
            if k not in _BROKER_HEADERS
        }
        copy = channel.prepare_message(
            raw_body(message),
            properties.pop("priority", None),
            properties.pop("content_type", None),
            properties.pop("content_encoding", None),
            headers,
            properties,
        )
        channel.basic_publish_confirm(copy, exchange="", routing_key=target, mandatory=True)
        channel.basic_ack(message.delivery_tag)
        moved += 1
    return moved


def _depth(channel: Any, name: str) -> int:
    return int(channel.queue_declare(name, passive=True).message_count)


def _exists(connection: Connection, name: str) -> bool:
    channel = connection.channel()
    try:
        channel.queue_declare(name, passive=True)
    except NotFound:
        return False
    finally:
        _close(channel)
    return True


def _close(channel: Any) -> None:
    if channel.is_open:
        channel.close()
