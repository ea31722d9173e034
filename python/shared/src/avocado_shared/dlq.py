"""The dead-letter queue seen from outside the workers: what died, why, and how to replay it.

Workers copy a poison message to ``ml.dlx`` with ``x-avocado-*`` headers that say why;
RabbitMQ dead-letters on its own (a rejected message, the delivery limit) with its
``x-death`` header. This module reads both, so an operator sees one list.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery.utils.saferepr import saferepr
from kombu.connection import Connection

from avocado_shared.contracts import InvalidRequest
from avocado_shared.errors import NotFound, TransientError
from avocado_shared.producer import SENT_AT_HEADER
from avocado_shared.redeclare import raw_body
from avocado_shared.topology import DEAD_LETTER_QUEUE, declare_dead_letter_queue

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "DEAD_LETTERED_AT_HEADER",
    "DEAD_LETTERED_BY_HEADER",
    "DEATHS_HEADER",
    "ORIGINAL_EXCHANGE_HEADER",
    "ORIGINAL_ROUTING_KEY_HEADER",
    "REASON_HEADER",
    "DeadLetter",
    "DeadLetterNotFound",
    "ReplayFailed",
    "copy_properties",
    "dead_letter_headers",
    "list_dead_letters",
    "raw_body",
    "read_letter",
    "replay",
]

REASON_HEADER = "x-avocado-reason"
ORIGINAL_EXCHANGE_HEADER = "x-avocado-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-avocado-original-routing-key"
DEAD_LETTERED_AT_HEADER = "x-avocado-dead-lettered-at"
DEAD_LETTERED_BY_HEADER = "x-avocado-dead-lettered-by"
DEATHS_HEADER = "x-avocado-deaths"

# Removed on replay: they describe the death, not the job. DEATHS_HEADER and RabbitMQ's
# x-death stay, so a job that dies again shows how often it did.
_DEATH_HEADERS = frozenset(
    {
        REASON_HEADER,
        ORIGINAL_EXCHANGE_HEADER,
        ORIGINAL_ROUTING_KEY_HEADER,
        DEAD_LETTERED_AT_HEADER,
        DEAD_LETTERED_BY_HEADER,
        SENT_AT_HEADER,  # a replay is a new publish: its queue wait starts now
        "x-delivery-count",
    }
)
# user_id must match the publisher's login and expiration would let a dead letter vanish.
_KEPT_PROPERTIES = ("correlation_id", "reply_to", "message_id", "timestamp", "type", "app_id")
_PERSISTENT = 2
_MAX_REASON = 2000
_PREVIEW = 200
_BROKER_REASONS = {
    "rejected": "rejected without requeue",
    "delivery_limit": "delivered more often than the delivery limit",
    "expired": "expired (message TTL)",
    "maxlen": "dropped over the queue length limit",
}


class ReplayFailed(TransientError):
    """The broker did not take the replayed message; the dead letter stays where it was."""


class DeadLetterNotFound(NotFound, LookupError):
    """No message with that id is in ``ml.dead-letter``."""

    def __init__(self, dead_letter_id: str) -> None:
        super().__init__(f"no dead letter with id {dead_letter_id!r} in {DEAD_LETTER_QUEUE}")
        self.dead_letter_id = dead_letter_id


@dataclass(frozen=True)
class DeadLetter:
    """One message in ``ml.dead-letter``: which job, why it died, where it was going."""

    id: str
    task: str | None
    reason: str
    original_exchange: str
    original_routing_key: str
    dead_lettered_at: str | None
    deaths: int
    body_preview: str
    content_type: str | None
    size: int
    dead_lettered_by: str | None
    headers: dict[str, Any] = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (x-death carries timestamps)."""
        data: dict[str, Any] = json.loads(json.dumps(asdict(self), default=_json_default))
        return data


def _utc_now() -> str:
    """ISO 8601 in UTC with a ``Z``, as the results write their times."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_headers(
    headers: Mapping[str, Any],
    *,
    reason: str,
    exchange: str,
    routing_key: str,
    by: str | None = None,
) -> dict[str, Any]:
    """The headers of a message copied to ``ml.dlx``: its own plus why and from where."""
    marked = {
        **headers,
        REASON_HEADER: reason[:_MAX_REASON],
        ORIGINAL_EXCHANGE_HEADER: exchange,
        ORIGINAL_ROUTING_KEY_HEADER: routing_key,
        DEAD_LETTERED_AT_HEADER: _utc_now(),
        DEATHS_HEADER: _int(headers.get(DEATHS_HEADER)) + 1,
    }
    if by:
        marked[DEAD_LETTERED_BY_HEADER] = by
    return marked


def copy_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    """The AMQP properties a re-published message keeps, made persistent."""
    kept = {key: (properties or {}).get(key) for key in _KEPT_PROPERTIES}
    return {**{k: v for k, v in kept.items() if v is not None}, "delivery_mode": _PERSISTENT}


def list_dead_letters(connection: Connection, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters, left in the queue.

    Each is fetched unacknowledged and put back in order, so a listing removes nothing;
    two listings at once each miss what the other holds. A listing counts as a delivery of
    each letter (``x-delivery-count``), but ``ml.dead-letter`` has no delivery limit on any
    RabbitMQ version, so no letter is ever dropped for having been read.
    """
    letters: list[DeadLetter] = []
    with _Scan(connection) as scan:
        while len(letters) < limit and (message := scan.next()) is not None:
            letters.append(read_letter(message))
    return letters


def replay(
    connection: Connection,
    dead_letter_id: str,
    *,
    body: bytes | None = None,
    app: Celery | None = None,
    timeout: float = 10.0,
) -> DeadLetter:
    """Re-publish one dead letter where it was going, then drop it from ``ml.dead-letter``.

    ``body`` replaces its body (JSON). The copy is persistent, publisher-confirmed and
    mandatory: when the broker does not take it, ``ReplayFailed`` is raised and the dead
    letter stays. Given ``app``, the job's stored result is forgotten first, so a waiting
    client sees the replay's outcome, not the failure that sent the job here.
    """
    if body is not None:
        _check_json(body)
    with _Scan(connection) as scan:
        message, letter = scan.find(dead_letter_id)
        if app is not None and letter.task is not None:
            app.AsyncResult(letter.id).forget()
        headers = {k: v for k, v in letter.headers.items() if k not in _DEATH_HEADERS}
        content_type, content_encoding = message.content_type, message.content_encoding
        if body is not None:
            headers = _with_reprs(headers, body)
            content_type, content_encoding = "application/json", "utf-8"
        channel = scan.channel
        copy = channel.prepare_message(
            raw_body(message) if body is None else body,
            (message.properties or {}).get("priority"),
            content_type,
            content_encoding,
            headers,
            copy_properties(message.properties),
        )
        try:
            channel.basic_publish_confirm(
                copy,
                exchange=letter.original_exchange,
                routing_key=letter.original_routing_key,
                mandatory=True,  # unroutable raises instead of being confirmed and dropped
                confirm_timeout=timeout,
            )
        except Exception as error:
            where = f"{letter.original_exchange or '(default)'}/{letter.original_routing_key}"
            raise ReplayFailed(f"{letter.id} not replayed to {where}: {error!r}") from error
        message.ack()
    return letter


class _Scan:
    """Reads ``ml.dead-letter`` on a channel of its own, holding what it read unacked.

    On exit it takes the rest of the queue too, then puts back whatever was not acked one by
    one in the order it was read: a quorum queue without a delivery limit returns a message
    to its back, so only a queue put back whole keeps its order (a channel close would
    return them in no particular order).
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.channel = connection.channel()
        self._held: list[Any] = []

    def __enter__(self) -> _Scan:
        self._queue = declare_dead_letter_queue(self._connection)(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.channel.is_open:
                while self.next() is not None:
                    pass
            for message in self._held:
                if not self.channel.is_open:
                    break
                if not message.acknowledged:
                    message.requeue()
        finally:
            self.channel.close()

    def next(self) -> Any:
        """The next dead letter, or None once the queue has no more."""
        message = self._queue.get(no_ack=False)
        if message is not None:
            self._held.append(message)
        return message

    def find(self, dead_letter_id: str) -> tuple[Any, DeadLetter]:
        """The first dead letter with this id, and its raw message."""
        while (message := self.next()) is not None:
            letter = read_letter(message)
            if letter.id == dead_letter_id:
                return message, letter
        raise DeadLetterNotFound(dead_letter_id)


def read_letter(message: Any) -> DeadLetter:
    """A message of ``ml.dlx`` (from ``ml.dead-letter`` or a queue of its own) as a
    ``DeadLetter``: its job, why it died, where it was going."""
    headers: dict[str, Any] = dict(message.headers or {})
    properties = message.properties or {}
    delivery = message.delivery_info or {}
    body = raw_body(message)
    deaths = [d for d in headers.get("x-death") or () if isinstance(d, Mapping)]
    count = _int(headers.get(DEATHS_HEADER)) + sum(_int(d.get("count"), 1) for d in deaths)
    task = headers.get("task")
    if REASON_HEADER in headers or not deaths:
        reason = str(headers.get(REASON_HEADER) or "unknown: no x-avocado-reason nor x-death")
        exchange = headers.get(ORIGINAL_EXCHANGE_HEADER)
        routing_key = headers.get(ORIGINAL_ROUTING_KEY_HEADER)
        at = headers.get(DEAD_LETTERED_AT_HEADER)
    else:  # dead-lettered by RabbitMQ itself; the latest death comes first
        death = deaths[0]
        why = str(death.get("reason"))
        reason = f"{_BROKER_REASONS.get(why, why)} in {death.get('queue')} (RabbitMQ: {why})"
        exchange = death.get("exchange")
        routing_key = next(iter(death.get("routing-keys") or ()), None)
        at = death.get("time")
    return DeadLetter(
        id=_identify(headers, properties, body),
        task=task if isinstance(task, str) else None,
        reason=reason,
        original_exchange=str(exchange if exchange is not None else ""),
        original_routing_key=str(routing_key or delivery.get("routing_key") or ""),
        dead_lettered_at=at.isoformat() if isinstance(at, datetime) else _str_or_none(at),
        deaths=count,
        body_preview=_preview(body),
        content_type=_str_or_none(message.content_type),
        size=len(body),
        dead_lettered_by=_str_or_none(headers.get(DEAD_LETTERED_BY_HEADER)),
        headers=headers,
    )


def _identify(headers: Mapping[str, Any], properties: Mapping[str, Any], body: bytes) -> str:
    """The Celery task id, else the AMQP message id, else a hash of the body."""
    for candidate in (headers.get("id"), properties.get("message_id")):
        if isinstance(candidate, str) and candidate:
            return candidate
    return "sha256-" + hashlib.sha256(body).hexdigest()[:32]


def _preview(body: bytes) -> str:
    text = body[: _PREVIEW * 4].decode("utf-8", errors="backslashreplace")
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


def _check_json(body: bytes) -> None:
    try:
        json.loads(body)
    except ValueError as error:
        raise InvalidRequest(f"the replacement body is not JSON: {error}") from None


def _with_reprs(headers: dict[str, Any], body: bytes) -> dict[str, Any]:
    """Refresh a task's ``argsrepr`` and ``kwargsrepr``: the worker logs them, Flower shows them."""
    if "task" not in headers:
        return headers
    try:
        args, kwargs, _ = json.loads(body)
    except (TypeError, ValueError):
        return headers
    return {**headers, "argsrepr": saferepr(args, 1024), "kwargsrepr": saferepr(kwargs, 1024)}


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
