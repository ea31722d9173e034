"""Poison messages go to ``ml.dlx`` with the reason they died, and the worker keeps serving.

Stock Celery 5.7 acks a message it cannot decode (it is lost), rejects other poison
without saying why, and dies ("Unrecoverable error") on a task message without an ``id``
header or whose body is not ``[args, kwargs, embed]``. Here each is copied to the
dead-letter exchange, body untouched and reason in its headers, publisher-confirmed,
then acked; when the broker does not take the copy, the original is rejected without
requeue and RabbitMQ dead-letters it itself (``x-death`` reason ``rejected``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from celery import Celery, Task, signals
from celery.exceptions import InvalidTaskError, NotRegistered, Reject
from celery.utils.objects import Bunch
from celery.worker.consumer.consumer import Consumer
from celery.worker.state import requests as active_requests
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps

from avocado_shared.dlq import copy_properties, dead_letter_headers, raw_body
from avocado_shared.topology import DEAD_LETTER_EXCHANGE

__all__ = [
    "DeadLetteringConsumer",
    "dead_letter_message",
    "dead_letter_task",
    "publish_dead_letter",
]

logger = logging.getLogger(__name__)

# A pooled connection may have gone stale while idle: one more try on a fresh one.
_ATTEMPTS = 2


def publish_dead_letter(
    app: Celery,
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any] | None,
    routing_key: str,
    timeout: float | None = None,
) -> None:
    """Publish to ``ml.dlx``: persistent, mandatory and confirmed, or raise."""
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
                    exchange=DEAD_LETTER_EXCHANGE.name,
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
        publish_dead_letter(
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
        publish_dead_letter(
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


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, except that poison is dead-lettered with its reason, never fatal,
    and delayed delivery is set up on the live broker only (``ollama_worker.delayed_delivery``).

    Wired in with ``worker_consumer = "ollama_worker.deadletter:DeadLetteringConsumer"``.
    """

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            "ollama_worker.delayed_delivery:DelayedDelivery"
            if step.endswith(":DelayedDelivery")
            else step
            for step in Consumer.Blueprint.default_steps
        ]

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Celery acks these, and the message is gone."""
        self._dead_letter(message, _decode_reason(message, exc))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a Celery task message: no 'task' header")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter, then fail the job in the result backend as Celery does."""
        headers = message.headers or {}
        name, task_id = headers.get("task"), headers.get("id")
        self._dead_letter(message, f"unknown task {name!r}: not registered on this worker")
        if task_id:
            self._fail_unknown(message, str(name), str(task_id))
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            reason = _decode_reason(message, exc)
        else:
            reason = f"invalid task message: {exc}"
        self._dead_letter(message, reason)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        """Celery's handler, guarded against the malformed messages that crash it."""
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            headers = message.headers if isinstance(message.headers, Mapping) else {}
            task_id = headers.get("id")
            if "task" in headers and not (isinstance(task_id, str) and task_id):
                error = InvalidTaskError("task message without an 'id' header")
                return self.on_invalid_task(None, message, error)
            try:
                return handle(message)
            except Exception as exc:
                if (
                    isinstance(exc, self.connection_errors + self.channel_errors)
                    or message.acknowledged
                    or (isinstance(task_id, str) and task_id in active_requests)
                ):
                    raise  # not a malformed message: Celery's own handling applies
                error = InvalidTaskError(
                    f"malformed task message, {type(exc).__name__}: {exc} "
                    "(a task body is [args, kwargs, embed])"
                )
                return self.on_invalid_task(None, message, error)

        return on_task_received

    def _dead_letter(self, message: Any, reason: str) -> None:
        dead_letter_message(
            self.app,
            message,
            reason,
            worker=self.hostname,
            connection_errors=self.connection_errors,
        )

    def _fail_unknown(self, message: Any, name: str, task_id: str) -> None:
        """Store NotRegistered, so a client waiting on the job fails now rather than never."""
        request = Bunch(
            name=name,
            chord=None,
            root_id=(message.headers or {}).get("root_id"),
            correlation_id=(message.properties or {}).get("correlation_id"),
            reply_to=(message.properties or {}).get("reply_to"),
            errbacks=None,
        )
        try:
            self.app.backend.mark_as_failure(task_id, NotRegistered(name), request=request)
        except Exception:
            logger.exception("could not store the failure of unknown task %s[%s]", name, task_id)
        if self.event_dispatcher:
            self.event_dispatcher.send(
                "task-failed", uuid=task_id, exception=f"NotRegistered({name!r})"
            )


class UndeclaringConsumer(DeadLetteringConsumer):
    """For a broker user that may not declare: without Celery's delayed-delivery step, which
    declares 28 exchanges and queues at every start (the admin declared them)."""

    class Blueprint(DeadLetteringConsumer.Blueprint):
        default_steps: ClassVar[list[str]] = [
            step
            for step in DeadLetteringConsumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]


def _decode_reason(message: Any, exc: Exception) -> str:
    kind = "content type not accepted" if isinstance(exc, ContentDisallowed) else "undecodable body"
    return f"{kind} ({message.content_type or 'no content type'}): {exc}"
