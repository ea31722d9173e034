"""What each fix applied in the package saves, and what each candidate not applied would:
``bench/fleet_app.py`` undoes one fix (or makes one candidate) in the real worker; every variant
and bare Celery are measured in one rotation."""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from avocado_shared import Producer
from bench.fleet_app import CANDIDATES, CHANGES, UNDONE, environment
from bench.report import fmt, median, percentile
from bench.scenarios import Config, alternate, bare, burst, done, fleet, noop_worker, timed_ms, warm
from bench.services import BenchEnv
from ollama_worker.testing.processes import WorkerProcess

__all__ = ["VARIANTS", "fixes"]

_ALL = f"all {len(UNDONE)} applied fixes undone ({', '.join(UNDONE)})"
# (label, changes made by bench/fleet_app.py, what they change)
VARIANTS: list[tuple[str, tuple[str, ...], str]] = [
    ("current fleet", (), "nothing"),
    *((f"{name} undone", (name,), CHANGES[name]) for name in UNDONE),
    ("the fleet before the fixes", tuple(UNDONE), _ALL),
    *((f"candidate: {name}", (name,), CHANGES[name]) for name in CANDIDATES),
]
_BARE = (
    "bare Celery no-op",
    (),
    "the dispatch baseline: no fleet code, same broker, queue and backend",
)


def fixes(env: BenchEnv, cfg: Config, pool: str) -> dict[str, Any]:
    """Sequential p50 and burst jobs/s of every variant, the current fleet and bare Celery:
    the rows of the fixes table."""
    sim = env.start_sim()
    latency: dict[str, list[float]] = collections.defaultdict(list)
    rates: dict[str, list[float]] = collections.defaultdict(list)

    def measure(
        label: str, submit: Callable[[int], Any], first: Callable[[], object]
    ) -> Callable[[int], None]:
        def run(rep: int) -> None:
            if rep == 0:
                first()
            latency[label].append(percentile(timed_ms(done(submit), cfg.fix_seq), 50))
            rates[label].append(cfg.fix_burst / burst(submit, cfg.fix_burst))

        return run

    def switched(rep: int, worker: WorkerProcess, run: Callable[[int], None]) -> None:
        env.control(worker, "add_consumer", queue="ml.generate")
        run(rep)
        env.control(worker, "cancel_consumer", queue="ml.generate")

    runs: list[Callable[[int], None]] = []
    workers: list[WorkerProcess] = []
    for label, names, _ in VARIANTS:
        worker = env.start_worker(
            app="bench.fleet_app",
            pool=pool,
            concurrency=cfg.concurrency,
            ollama_url=sim.url,
            queues=f"bench.idle.{uuid.uuid4().hex[:6]}",  # switched on in turn: add_consumer
            wait=False,
            variables=environment(list(names)),
        )
        # The producer's side of a setting the variant changes (task-sent events).
        producer = env.closing(Producer(env.make_settings(task_events="events" in names)))
        run = measure(label, fleet(producer), partial(warm, producer, cfg.concurrency))
        runs.append(partial(switched, worker=worker, run=run))
        workers.append(worker)
    noop = bare(env)
    workers.append(noop_worker(env, cfg, pool, wait=False))
    env.wait_ready(*workers)
    runs.append(measure(_BARE[0], noop, lambda: burst(noop, cfg.concurrency * 3)))
    alternate(cfg.reps, *runs)
    p50 = {label: median(values) for label, values in latency.items()}
    rate = {label: median(values) for label, values in rates.items()}
    now = VARIANTS[0][0]

    def rated(label: str) -> list[str]:
        return [fmt(rate[label], 1), f"x{fmt(rate[label] / rate[now])}"]

    return {
        "fixes": [
            [label, changed, fmt(p50[label]), f"{p50[label] - p50[now]:+.2f}", *rated(label)]
            for label, _, changed in [*VARIANTS, _BARE]
        ]
    }
