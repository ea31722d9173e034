"""Jobs that arrive on ``ml.generate``, ``ml.summarize`` or ``ml.embed`` go on to their
model's lane queue.

Those queues take the jobs of producers that publish without a model queue (a plain AMQP
client, an earlier release, a job queued before an upgrade). Every worker consumes them and
forwards each job, untouched, to the lane queue of the model it names (the lane its
``x-avocado-lane`` header says, batch by default), where only nodes that serve the model take
it: the copy is publisher-confirmed before the original is acknowledged, so a job is never
lost and at worst queued twice (its lease and stored result make the second a no-op). A job
whose body cannot be read, whose task is not a job's or whose request breaks its contract is
not forwarded: the worker's usual path dead-letters it there, with its reason.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from celery import Celery
from pydantic import BaseModel

from avocado_shared.contracts import (
    EmbedRequest,
    GenerateRequest,
    InvalidRequest,
    SummarizeRequest,
    validate_request,
)
from avocado_shared.dlq import raw_body
from avocado_shared.routing import LANE_HEADER, lane_queue_name, model_of, parse_lane
from avocado_shared.settings import Settings
from avocado_shared.topology import (
    EMBED_QUEUE,
    EMBED_TASK,
    GENERATE_QUEUE,
    GENERATE_TASK,
    ML_EXCHANGE,
    SUMMARIZE_QUEUE,
    SUMMARIZE_TASK,
    declare_lane_queues,
)
from ollama_worker.deadletter import publish_confirmed

__all__ = ["Forwarder"]

logger = logging.getLogger(__name__)

_ENTRY_QUEUES = frozenset({GENERATE_QUEUE, SUMMARIZE_QUEUE, EMBED_QUEUE})
# Set by the broker on each delivery; the copy starts its own count.
_BROKER_HEADERS = ("x-delivery-count",)
_CONTRACTS: dict[str, type[BaseModel]] = {
    GENERATE_TASK: GenerateRequest,
    SUMMARIZE_TASK: SummarizeRequest,
    EMBED_TASK: EmbedRequest,
}


class Forwarder:
    """Forwards a worker's received entry-queue jobs; declares each model's queues once."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._declared: set[str] = set()
        self._lock = threading.Lock()

    def forwards(self, message: Any, connection_errors: tuple[type[BaseException], ...]) -> bool:
        """Forward ``message`` when it came through an entry queue and names a model it can
        be routed by; True when it was (and is acknowledged)."""
        delivery = message.delivery_info or {}
        if delivery.get("routing_key") not in _ENTRY_QUEUES:
            return False
        model = self._model(message)
        if model is None:
            return False
        headers = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS}
        try:
            lane = parse_lane(headers.get(LANE_HEADER))
        except ValueError as error:
            logger.warning("job %s: %s; batch lane", headers.get("id"), error)
            lane = parse_lane(None)
        routing_key = lane_queue_name(model, lane)
        try:
            self._declare(model)
            publish_confirmed(
                self.app,
                raw_body(message),
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers=headers,
                properties=message.properties,
                exchange=ML_EXCHANGE.name,
                routing_key=routing_key,
            )
        except Exception:
            logger.exception(
                "job %s not forwarded to %s: back to its queue", headers.get("id"), routing_key
            )
            message.reject_log_error(logger, connection_errors, requeue=True)
            return True
        logger.info("job %s forwarded to %s", headers.get("id"), routing_key)
        message.ack_log_error(logger, connection_errors)
        return True

    def _model(self, message: Any) -> str | None:
        """The canonical model the job names (the fleet's default when none); None when it
        is not a job of the fleet's with a valid request."""
        contract = _CONTRACTS.get(str((message.headers or {}).get("task")))
        if contract is None:
            return None
        try:
            request = json.loads(raw_body(message))[1]["request"]
            validate_request(contract, request)
        except (ValueError, TypeError, KeyError, IndexError, InvalidRequest):
            return None
        return model_of(request, self.settings.default_model, self.settings.embed_model)

    def _declare(self, model: str) -> None:
        if model in self._declared:
            return
        with self._lock, self.app.connection_for_write() as connection:
            declare_lane_queues(connection, model, self.settings)
            self._declared.add(model)
