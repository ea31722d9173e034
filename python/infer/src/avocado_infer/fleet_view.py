"""What the web page's fleet view shows (``GET /ui/api/fleet``): the live nodes as each last
said of itself, the models with their backlog per lane, the recent answers' speed and, to an
admin key, the recent failures and dead letters. Each part is read on its own, and one that
cannot be read says why (as ``avocado status`` does), so the page is useful exactly when
something is down. Every read blocks: run it off the event loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from amqp.exceptions import NotFound

from avocado_shared.contracts import JobKind
from avocado_shared.fleet import WorkerRecord
from avocado_shared.routing import Lane
from avocado_shared.status import dead_letter_section, failure_section
from avocado_shared.store import JobStatus, ResultRow
from avocado_shared.topology import DEAD_LETTER_QUEUE

if TYPE_CHECKING:
    from avocado_infer.gateway import Gateway

__all__ = ["FleetView"]

_RECENT = 20  # answers the speed is read from
# Failures and dead letters shown. Reading a dead letter means taking it from the queue's
# head and handing it back: the newest are read again only when their count has changed.
_SHOWN = 5


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _part(read: Callable[[], Any]) -> dict[str, Any]:
    """``{"items": ...}``, or ``{"error": why}`` when the part cannot be read now."""
    try:
        return {"items": read(), "error": None}
    except Exception as error:  # one part down is shown, never fatal to the others
        return {"items": [], "error": f"{type(error).__name__}: {error}"}


def _node(record: WorkerRecord) -> dict[str, Any]:
    return {
        "worker": record.worker,
        "backend": record.backend,
        "models": [record.names.get(m, m) for m in record.models],
        "loaded": [record.names.get(m, m) for m in record.loaded],
        "slots": record.slots,
        "running": record.running,
        "draining": record.draining,
        "time_left_s": record.time_left_s(),
        "seen_at": _iso(record.updated_at),
    }


def _answer(row: ResultRow) -> dict[str, Any]:
    tokens = row.completion_tokens or 0
    eval_s = (row.eval_duration_ms or 0) / 1000
    return {
        "job_id": row.job_id,
        "model": row.model,
        "worker": row.worker,
        "attempts": row.attempts,
        "tokens": tokens,
        "tokens_per_s": round(tokens / eval_s, 1) if eval_s > 0 else None,
        "at": _iso(row.updated_at),
    }


class FleetView:
    """Reads the fleet for the page; remembers the newest dead letters until their count
    changes, so a page polling every few seconds does not read the queue each time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._lock = threading.Lock()
        self._letters: tuple[int, list[dict[str, Any]]] = (0, [])

    def read(self, admin: bool) -> dict[str, Any]:
        """The whole view; failures and dead letters only for ``admin`` (they name every
        key's jobs)."""
        gateway = self._gateway
        view = {
            "at": _iso(datetime.now(timezone.utc)),
            "nodes": _part(lambda: [_node(r) for r in gateway.workers.live()]),
            "models": _part(self._models),
            "answers": _part(self._answers),
        }
        if admin:
            view["failures"] = _part(self._failures)
            view["dead_letters"] = _part(self._dead_letters)
        return view

    def _models(self) -> list[dict[str, Any]]:
        """Each served model; its backlog as the broker counts it (``Backlog.confirmed``), not
        with this gateway's jobs of the last second added, which its workers may have taken."""
        gateway = self._gateway
        return [
            {
                "name": m.label,
                "loaded_on": list(m.loaded_on),
                **m.view(),
                "backlog": {lane.value: gateway.backlog(m.name, lane).confirmed() for lane in Lane},
            }
            for m in gateway.served_models()
        ]

    def _answers(self) -> list[dict[str, Any]]:
        results = self._gateway.producer.results
        rows = results.recent(limit=_RECENT, status=JobStatus.SUCCESS)
        return [_answer(row) for row in rows if row.task_type != JobKind.EMBED.value]

    def _failures(self) -> list[dict[str, Any]]:
        return failure_section(self._gateway.producer, _SHOWN).items

    def _dead_letters(self) -> dict[str, Any]:
        """Their count, and the newest few (read again only when the count changed)."""
        producer = self._gateway.producer
        with self._lock, producer.app.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, timeout=self._gateway.settings.ready_timeout_s
            )
            try:
                declared = connection.default_channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)
                count = int(declared.message_count)
            except NotFound:  # no job has been dead-lettered on this broker yet
                count = 0
            if count != self._letters[0]:
                self._letters = (count, dead_letter_section(connection, count, _SHOWN).items)
            return {"count": count, "newest": self._letters[1]}
