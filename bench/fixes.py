"""What each fix applied in the package saves, and what each candidate not applied would, all
measured in one rotation: ``bench/fleet_app.py`` undoes one fix (or makes one candidate)."""

from __future__ import annotations

import collections
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

from avocado_shared import Producer
from bench.fleet_app import CANDIDATES, CHANGES, UNDONE, environment
from bench.report import fmt, median, percentile
from bench.scenarios import (
    Config,
    Submit,
    alternate,
    bare,
    burst,
    done,
    fleet,
    fleet_worker,
    noop_worker,
    timed_ms,
    warm,
)
from bench.services import BenchEnv
from tests.processes import WorkerProcess

__all__ = ["VARIANTS", "fixes"]

_ALL = f"all {len(UNDONE)} applied fixes undone ({', '.join(UNDONE)})"
# (label, changes made by bench/fleet_app.py, what they change)
VARIANTS: list[tuple[str, tuple[str, ...], str]] = [
    ("current fleet", (), "nothing"),
    *((f"{name} undone", (name,), CHANGES[name]) for name in UNDONE),
    ("the fleet before the fixes", tuple(UNDONE), _ALL),
    *((f"candidate: {name}", (name,), CHANGES[name]) for name in CANDIDATES),
]
_BASELINE = "the dispatch baseline: no fleet code, same broker, queue and backend"
_BARE = ("bare Celery no-op", (), _BASELINE)


def fixes(env: BenchEnv, cfg: Config, pool: str) -> dict[str, Any]:
    """Sequential p50 and burst jobs/s of every variant and bare Celery: the fixes table's rows."""
    sim, noop = env.start_sim(), bare(env)
    found: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)

    def measure(label: str, submit: Submit, worker: WorkerProcess | None) -> Callable[[int], None]:
        def run(rep: int) -> None:
            # A variant's worker consumes only while it is measured (add_consumer).
            with env.consuming(worker) if worker else contextlib.nullcontext():
                if rep == 0:
                    warm(submit, cfg.concurrency)
                p50 = percentile(timed_ms(done(submit), cfg.fix_seq), 50)
                found[label].append((p50, cfg.fix_burst / burst(submit, cfg.fix_burst)))

        return run

    runs, workers = [], []
    for label, names, _ in VARIANTS:
        idle = f"bench.idle.{uuid.uuid4().hex[:6]}"
        options = {"app": "bench.fleet_app", "queues": idle, "variables": environment(list(names))}
        worker = fleet_worker(env, cfg, pool, sim, False, **options)
        # The producer's side of a setting the variant changes (task-sent events).
        producer = env.closing(Producer(env.make_settings(task_events="events" in names)))
        runs.append(measure(label, fleet(producer), worker))
        workers.append(worker)
    env.wait_ready(*workers, noop_worker(env, cfg, pool, wait=False))
    alternate(cfg.reps, *runs, measure(_BARE[0], noop, None))
    figures = {label: tuple(map(median, zip(*got, strict=True))) for label, got in found.items()}
    (p50_now, rate_now), rows = figures[VARIANTS[0][0]], []
    for label, _, changed in [*VARIANTS, _BARE]:
        p50, rate = figures[label]
        vs = f"{p50 - p50_now:+.2f}", fmt(rate, 1), f"x{fmt(rate / rate_now)}"
        rows.append([label, changed, fmt(p50), *vs])
    return {"fixes": rows}
