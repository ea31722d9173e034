"""Poison goes to ``ml.dlx`` with the reason it died: a copy, body untouched and reason in
its headers, publisher-confirmed, then the original acked; when the broker does not take the
copy, the original is rejected without requeue and RabbitMQ dead-letters it itself
(``x-death`` reason ``rejected``). The consumer that sends received poison here is
``overrides.consumer``; a job whose payload breaks its contract sends itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps

from avocado_shared.dlq import copy_properties, dead_letter_headers, raw_body
from avocado_shared.topology import DEAD_LETTER_EXCHANGE

__all__ = ["dead_letter_message", "dead_letter_task", "decode_reason", "publish_confirmed"]

logger = logging.getLogger(__name__)

# A pooled connection may have gone stale while idle: one more try on a fresh one.
_ATTEMPTS = 2


def publish_confirmed(
    app: Celery,
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any] | None,
    routing_key: str,
    exchange: str = DEAD_LETTER_EXCHANGE.name,
    timeout: float | None = None,
) -> None:
    """Publish a copy of a message (to ``ml.dlx`` unless told): persistent, mandatory and
    confirmed, or raise."""
    timeout = float(app.conf.avocado_publish_timeout_s) if timeout is None else timeout
    priority = (properties or {}).get("priority")
    failure: Exception | None = None
    for _ in range(_ATTEMPTS):
        with app.pool.acquire(block=True, timeout=timeout) as connection:
            try:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
                channel = connection.channel()
                message = channel.prepare_message(
                    body,
                    priority,
                    content_type,
                    content_encoding,
                    dict(headers),
                    copy_properties(properties),
                )
                channel.basic_publish_confirm(
                    message,
                    exchange=exchange,
                    routing_key=routing_key,
                    mandatory=True,  # unroutable raises instead of being confirmed and dropped
                    confirm_timeout=timeout,
                )
                channel.close()
                return
            except Exception as error:
                failure = error
                connection.collect()  # a half-done channel must not serve the next publish
    assert failure is not None
    raise failure


def dead_letter_message(
    app: Celery,
    message: Any,
    reason: str,
    *,
    worker: str | None = None,
    connection_errors: tuple[type[BaseException], ...] = (),
    timeout: float | None = None,
) -> bool:
    """Copy a received message to ``ml.dlx`` with ``reason``, then ack it.

    Returns False when the copy failed and the message was rejected instead, so
    RabbitMQ dead-letters it without our reason headers. Never requeues it.
    """
    delivery = message.delivery_info or {}
    exchange = str(delivery.get("exchange") or "")
    routing_key = str(delivery.get("routing_key") or "")
    headers = message.headers or {}
    ident = headers.get("id") or (message.properties or {}).get("message_id") or "-"
    try:
        publish_confirmed(
            app,
            raw_body(message),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=dead_letter_headers(
                headers, reason=reason, exchange=exchange, routing_key=routing_key, by=worker
            ),
            properties=message.properties,
            routing_key=routing_key,
            timeout=timeout,
        )
    except Exception:
        logger.exception(
            "could not dead-letter message %s from %s/%s (%s): rejecting it instead",
            ident,
            exchange,
            routing_key,
            reason,
        )
        message.reject_log_error(logger, connection_errors, requeue=False)
        return False
    logger.error("dead-lettered message %s from %s/%s: %s", ident, exchange, routing_key, reason)
    message.ack_log_error(logger, connection_errors)
    return True


def dead_letter_task(task: Task, reason: str) -> None:
    """Copy the running job's message to ``ml.dlx`` with ``reason``; the caller then fails it.

    The message is rebuilt from ``task.request`` (protocol 2, JSON). If the broker does not
    take the copy this raises ``Reject(requeue=False)``: Celery then records the failure and
    rejects the message, which RabbitMQ dead-letters (reason ``rejected``) instead of it being
    acked and lost.
    """
    request = task.request
    delivery = request.delivery_info or {}
    if request.called_directly or request.is_eager or not delivery:
        logger.warning("%s ran without a message: nothing to dead-letter (%s)", task.name, reason)
        return
    exchange = str(delivery.get("exchange") or "")
    routing_key = str(delivery.get("routing_key") or "")
    headers, body = _task_message(task)
    content_type, content_encoding, data = dumps(body, serializer="json")
    try:
        publish_confirmed(
            task.app,
            data.encode(content_encoding) if isinstance(data, str) else data,
            content_type=content_type,
            content_encoding=content_encoding,
            headers=dead_letter_headers(
                headers,
                reason=reason,
                exchange=exchange,
                routing_key=routing_key,
                by=request.hostname,
            ),
            properties=request.properties or {"correlation_id": request.id},
            routing_key=routing_key,
        )
    except Exception as error:
        logger.exception("%s[%s] could not be dead-lettered: rejecting it", task.name, request.id)
        raise Reject(reason, requeue=False) from error
    logger.error("%s[%s] dead-lettered: %s", task.name, request.id, reason)


def _task_message(task: Task) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """Protocol 2 headers and body of the running job, as ``Task.retry`` would send them."""
    request = task.request
    hard, soft = request.timelimit or (None, None)
    message = task.app.amqp.as_task_v2(
        request.id,
        getattr(request, "task", None) or task.name,
        args=request.args,
        kwargs=request.kwargs,
        eta=request.eta,
        expires=request.expires,
        retries=request.retries or 0,
        group_id=request.group,
        group_index=request.group_index,
        chord=request.chord,
        callbacks=request.callbacks,
        errbacks=request.errbacks,
        chain=request.chain,
        reply_to=request.reply_to,
        time_limit=hard,
        soft_time_limit=soft,
        root_id=request.root_id,
        parent_id=request.parent_id,
        shadow=request.shadow,
        origin=request.origin,
        ignore_result=bool(request.ignore_result),
        replaced_task_nesting=request.replaced_task_nesting or 0,
        stamped_headers=request.stamped_headers,
        **(request.stamps or {}),
    )
    # Headers Celery does not know (x-death, x-avocado-deaths, a caller's own) ride along.
    original = (request.properties or {}).get("application_headers") or {}
    return {**original, **message.headers}, tuple(message.body)


def decode_reason(message: Any, exc: Exception) -> str:
    """Why a message could not be taken in: its content type refused, or its body unreadable."""
    kind = "content type not accepted" if isinstance(exc, ContentDisallowed) else "undecodable body"
    return f"{kind} ({message.content_type or 'no content type'}): {exc}"
