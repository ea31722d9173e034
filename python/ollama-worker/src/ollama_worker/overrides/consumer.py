"""Celery's consumer, keeping poison it receives instead of losing it or dying of it, and
forwarding what arrives on the entry queues to the model's lane queue (``ollama_worker.forward``).

Celery 5.7 acks a message it cannot decode (it is lost), rejects other poison without saying
why, and dies ("Unrecoverable error") on a task message without an ``id`` header or whose
body is not ``[args, kwargs, embed]``. Here each goes to ``ml.dlx`` with its reason
(``ollama_worker.deadletter``) and the worker keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from celery import signals
from celery.exceptions import InvalidTaskError, NotRegistered
from celery.utils.objects import Bunch
from celery.worker.consumer.consumer import Consumer
from celery.worker.state import requests as active_requests
from kombu.exceptions import ContentDisallowed

from ollama_worker.deadletter import dead_letter_message, decode_reason
from ollama_worker.forward import Forwarder

__all__ = ["DeadLetteringConsumer"]

logger = logging.getLogger(__name__)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, except that poison is dead-lettered with its reason, never fatal,
    and without Celery's delayed-delivery step: ``create_app`` adds this package's own when
    the worker may declare (``delayed_delivery``)."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            step
            for step in Consumer.Blueprint.default_steps
            if step != "celery.worker.consumer.delayed_delivery:DelayedDelivery"
        ]

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Celery acks these, and the message is gone."""
        self._dead_letter(message, decode_reason(message, exc))

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
            reason = decode_reason(message, exc)
        else:
            reason = f"invalid task message: {exc}"
        self._dead_letter(message, reason)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        """Celery's handler, guarded against the malformed messages that crash it; a job
        from an entry queue is forwarded to its model's lane queue instead of run here."""
        handle = super().create_task_handler(*args, **kwargs)
        forwarder = Forwarder(self.app, self.app.settings)

        def on_task_received(message: Any) -> Any:
            headers = message.headers if isinstance(message.headers, Mapping) else {}
            task_id = headers.get("id")
            if "task" in headers and not (isinstance(task_id, str) and task_id):
                error = InvalidTaskError("task message without an 'id' header")
                return self.on_invalid_task(None, message, error)
            if "task" in headers and forwarder.forwards(message, self.connection_errors):
                return None
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
