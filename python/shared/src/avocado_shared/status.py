"""``avocado status``: the fleet on one screen — queues, workers, dead letters, endpoints and
recent failures.

Each part is read on its own and a part that cannot be read says why, so the screen is most
useful exactly when something is down; ``Status.ok`` is false then.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection

from avocado_shared.dlq import DeadLetter, list_dead_letters
from avocado_shared.fleet import WorkerRecord, WorkerRegistry
from avocado_shared.registry import NodeRegistry
from avocado_shared.store import JobStatus, ResultRow
from avocado_shared.topology import DEAD_LETTER_QUEUE, QueueInfo, describe

if TYPE_CHECKING:
    from celery import Celery

    from avocado_shared.producer import Producer

__all__ = ["Section", "Status", "collect", "dead_letter_section", "failure_section", "render"]

# Showing the newest dead letters means reading the queue from its head, and every read
# counts as a delivery of the message: read no further than this.
DEAD_LETTER_SCAN_MAX = 500
_BROKER_CONNECT_TIMEOUT_S = 5.0


@dataclass
class Section:
    """One part of the screen: its rows, or why it could not be read."""

    items: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, **self.facts, "items": self.items}


@dataclass
class Status:
    """What ``avocado status`` shows."""

    at: datetime
    queues: Section
    workers: Section
    dead_letters: Section
    endpoints: Section
    failures: Section

    def sections(self) -> dict[str, Section]:
        return {
            "queues": self.queues,
            "workers": self.workers,
            "dead_letters": self.dead_letters,
            "endpoints": self.endpoints,
            "failures": self.failures,
        }

    @property
    def ok(self) -> bool:
        """Every part could be read (not: the fleet is healthy)."""
        return all(section.ok for section in self.sections().values())

    def to_json(self) -> dict[str, Any]:
        parts = {name: section.to_json() for name, section in self.sections().items()}
        return {"at": _iso(self.at), "ok": self.ok, **parts}


def _failed(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _read(read: Callable[[], Section]) -> Section:
    """A part that raises becomes a part that says why; the others are still read."""
    try:
        return read()
    except Exception as error:  # any failure of one part is reported, never fatal
        return Section(error=_failed(error))


def collect(
    producer: Producer, *, dead_letters: int = 5, failures: int = 5, timeout: float = 1.0
) -> Status:
    """Read every part; ``timeout`` is how long workers get to answer a ping."""
    fleet: list[WorkerRecord] = []
    models: set[str] = set()
    # Unreadable: the endpoints part, read from the same Redis, says why.
    with contextlib.suppress(Exception):
        fleet, models = _fleet(producer)
    queues, workers, letters = _broker_parts(producer, dead_letters, timeout, sorted(models))
    if workers.ok:
        _add_records(workers, fleet)
    return Status(
        at=datetime.now(timezone.utc),
        queues=queues,
        workers=workers,
        dead_letters=letters,
        endpoints=_read(lambda: _endpoints(producer)),
        failures=_read(lambda: failure_section(producer, failures)),
    )


def _fleet(producer: Producer) -> tuple[list[WorkerRecord], set[str]]:
    """The workers' own records, and every model a worker serves or a job was queued for."""
    registry = WorkerRegistry.from_settings(producer.settings)
    try:
        records = registry.live()
        wanted = registry.wanted()
    finally:
        registry.close()
    return records, wanted | {model for record in records for model in record.models}


def _add_records(workers: Section, records: list[WorkerRecord]) -> None:
    """Each worker's models, slots and cutoff, as it says of itself."""
    by_name = {record.worker: record for record in records}
    for item in workers.items:
        record = by_name.get(item["name"])
        if record is not None:
            item.update(
                models=record.models,
                loaded=record.loaded,
                slots=record.slots,
                draining=record.draining,
                time_left_s=record.time_left_s(),
            )


def _broker_parts(
    producer: Producer, dead_letters: int, timeout: float, models: Sequence[str]
) -> tuple[Section, Section, Section]:
    """Queues, workers and dead letters: all read from RabbitMQ on one connection."""
    with producer.app.connection_for_write() as connection:
        try:
            connection.ensure_connection(
                max_retries=1, interval_start=0, timeout=_BROKER_CONNECT_TIMEOUT_S
            )
        except Exception as error:  # kombu wraps socket, AMQP and auth errors alike
            why = f"broker unreachable: {_failed(error)}"
            return Section(error=why), Section(error=why), Section(error=why)
        infos: list[QueueInfo] = []

        def queues() -> Section:
            infos.extend(describe(connection, producer.settings, models))
            return Section()

        queue_part = _read(queues)
        worker_part = _read(lambda: _workers(producer.app, connection, timeout))
        depth = next((i.messages for i in infos if i.name == DEAD_LETTER_QUEUE), None)
        letter_part = _read(lambda: dead_letter_section(connection, depth, dead_letters))
    if queue_part.ok:
        held = worker_part.facts.get("held_by_routing_key") if worker_part.ok else None
        queue_part.items = [_queue_row(info, held) for info in infos]
    return queue_part, worker_part, letter_part


def _queue_row(info: QueueInfo, held: dict[str, int] | None) -> dict[str, Any]:
    """A queue's depth and consumers; unacked as the workers report holding them."""
    unacked = None
    if held is not None and info.name != DEAD_LETTER_QUEUE:
        unacked = sum(n for key, n in held.items() if _routes_to(key, info.routing_key))
    return {
        "name": info.name,
        "ready": info.messages,
        "unacked": unacked,
        "consumers": info.consumers,
    }


def _routes_to(routing_key: str, queue_key: str) -> bool:
    """Native delayed delivery prefixes a retry's routing key with its delay bits."""
    return routing_key == queue_key or routing_key.endswith(f".{queue_key}")


def _workers(app: Celery, connection: Connection, timeout: float) -> Section:
    """Workers that answer a ping, with the queues they consume and the jobs they hold."""
    replies = app.control.ping(timeout=timeout, connection=connection) or []
    names = sorted({name for reply in replies for name in reply})
    if not names:
        return Section(facts={"online": 0, "held_by_routing_key": {}})
    inspect = app.control.inspect(
        destination=names, timeout=timeout, connection=connection, limit=len(names)
    )
    consumed = inspect.active_queues() or {}
    running = inspect.active() or {}
    prefetched = inspect.reserved() or {}
    held: Counter[str] = Counter()
    items = []
    for name in names:
        jobs = [*running.get(name, []), *prefetched.get(name, [])]
        held.update(str((job.get("delivery_info") or {}).get("routing_key", "")) for job in jobs)
        items.append(
            {
                "name": name,
                "queues": sorted(q["name"] for q in consumed.get(name, [])),
                "running": len(running.get(name, [])),
                "prefetched": len(prefetched.get(name, [])),
            }
        )
    return Section(items=items, facts={"online": len(names), "held_by_routing_key": dict(held)})


def dead_letter_section(connection: Connection, depth: int | None, newest: int) -> Section:
    """The count, and the newest ``newest`` read from the head of the queue (``depth``
    letters, as the broker counts them; None: not known), as the screen and the gateway's web
    page show them.

    ``list_dead_letters`` holds what it reads and puts it back in order: nothing is removed.
    """
    if newest <= 0 or depth == 0:
        return Section(facts={"count": depth, "scanned": 0})
    scan = DEAD_LETTER_SCAN_MAX if depth is None else min(depth, DEAD_LETTER_SCAN_MAX)
    letters = list_dead_letters(connection, limit=scan)
    shown = letters[-newest:][::-1]
    return Section(
        items=[_letter_row(letter) for letter in shown],
        facts={"count": depth, "scanned": len(letters)},
    )


def _letter_row(letter: DeadLetter) -> dict[str, Any]:
    row = letter.to_json()
    row.pop("headers", None)  # `avocado dlq list --json` has them
    return row


def _endpoints(producer: Producer) -> Section:
    registry = NodeRegistry.from_settings(producer.settings)
    try:
        live = registry.live()
    finally:
        registry.close()
    items = [
        {**e.model_dump(mode="json"), "expires_at": _iso(e.expires_at)}
        for e in sorted(live, key=lambda e: e.service_id)
    ]
    return Section(items=items)


def failure_section(producer: Producer, limit: int) -> Section:
    """The newest ``limit`` failed jobs, as the screen and the gateway's web page show them."""
    if limit <= 0:
        return Section()
    rows = producer.results.recent(limit=limit, status=JobStatus.FAILURE)
    return Section(items=[_failure_row(row) for row in rows])


def _failure_row(row: ResultRow) -> dict[str, Any]:
    return {
        "job_id": row.job_id,
        "task_type": row.task_type,
        "share_id": row.share_id,
        "error": row.error,
        "model": row.model,
        "worker": row.worker,
        "attempts": row.attempts,
        "updated_at": _iso(row.updated_at),
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- text -------------------------------------------------------------------------------------


def render(status: Status, as_json: bool = False) -> str:
    """The screen, or with ``as_json`` the same as one JSON document."""
    if as_json:
        return json.dumps(status.to_json(), indent=2)
    lines = [f"avocado status at {_iso(status.at)}"]
    for title, section, body in (
        ("queues", status.queues, _queues_text),
        ("workers", status.workers, _workers_text),
        ("dead letters", status.dead_letters, _letters_text),
        ("endpoints", status.endpoints, _endpoints_text),
        ("recent failures (ml_results)", status.failures, _failures_text),
    ):
        lines.append("")
        if section.error is not None:
            lines.append(f"{title}: UNAVAILABLE ({section.error})")
        else:
            lines.extend(body(title, section))
    return "\n".join(lines)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _queues_text(title: str, section: Section) -> Sequence[str]:
    width = max([16, *(len(q["name"]) for q in section.items)])
    lines = [f"{title}", f"  {'name':<{width}} {'ready':>7} {'unacked':>8} {'consumers':>10}"]
    lines += [
        f"  {q['name']:<{width}} {q['ready']:>7} {_dash(q['unacked']):>8} {q['consumers']:>10}"
        for q in section.items
    ]
    return lines


def _workers_text(title: str, section: Section) -> Sequence[str]:
    lines = [f"{title}: {section.facts.get('online', 0)} online"]
    for w in section.items:
        line = f"  {w['name']}  running={w['running']} prefetched={w['prefetched']}"
        if "models" in w:
            loaded = set(w["loaded"])
            models = ",".join(f"{m}{'*' if m in loaded else ''}" for m in w["models"])
            line += f" slots={w['slots']}  models={models or '-'}"
            if w["draining"]:
                left = w["time_left_s"]
                line += f"  DRAINING ({_dash(None if left is None else round(left))} s left)"
        lines.append(f"{line}  queues={','.join(w['queues']) or '-'}")
    if any("models" in w for w in section.items):
        lines.append("  (* loaded in its server's memory)")
    return lines


def _letters_text(title: str, section: Section) -> Sequence[str]:
    count, scanned = section.facts.get("count"), section.facts.get("scanned", 0)
    head = f"{title}: {_dash(count)} in {DEAD_LETTER_QUEUE}"
    if section.items:
        head += f", newest {len(section.items)}"
        if count is not None and scanned < count:
            head += f" of the oldest {scanned} read (avocado dlq list shows more)"
    lines = [head]
    lines += [
        f"  {d['id']}  {d['task'] or '-'}  {d['dead_lettered_at'] or '-'}  {d['reason']}"
        for d in section.items
    ]
    return lines


def _endpoints_text(title: str, section: Section) -> Sequence[str]:
    lines = [f"{title}: {len(section.items)} live"]
    lines += [
        f"  {e['service_id']}  {e['url']}  models={','.join(e['models']) or '-'}  "
        f"until={e['expires_at']}"
        for e in section.items
    ]
    return lines


def _failures_text(title: str, section: Section) -> Sequence[str]:
    lines = [f"{title}: {len(section.items)} shown"]
    for row in section.items:
        error = (row["error"] or "-").splitlines()[0][:160]
        lines.append(
            f"  {row['updated_at']}  {row['job_id']}  {row['task_type']}  "
            f"on {row['worker'] or '-'}  {error}"
        )
    return lines
