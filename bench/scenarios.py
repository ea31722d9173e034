"""The five scenarios of issue 6, each run against its baseline in the same run, alternating."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import psutil
from celery import Celery
from tests.services import wait_for

from avocado_shared import Producer
from bench.noop_app import NOOP_TASK, make_app, noop_queue
from bench.outcome import Outcome, Row
from bench.services import MODEL, BenchEnv, Worker
from bench.stats import fmt, median, percentile, spread
from ollama_worker.ollama import OllamaClient
from ollama_worker.settings import WorkerSettings

__all__ = [
    "Config",
    "dispatch",
    "memory",
    "overhead",
    "saturation",
    "scale_out",
]

_GET_TIMEOUT_S = 300.0

_POOL_FIELD = WorkerSettings.model_fields["worker_pool"]
DEFAULT_POOL: str = _POOL_FIELD.default
"""The worker's default pool (``AVOCADO_WORKER_POOL``), the one every single-pool part runs."""
POOLS: tuple[str, ...] = (
    DEFAULT_POOL,
    *(p for p in get_args(_POOL_FIELD.annotation) if p != DEFAULT_POOL),
)
"""Every pool the worker offers, the default first."""


@dataclass
class Config:
    """Sizes of one run; ``quick`` shrinks every one of them."""

    quick: bool = False
    reps: int = 5
    concurrency: int = 4
    pools: Sequence[str] = POOLS
    default_pool: str = DEFAULT_POOL
    overhead_jobs: int = 120
    saturation_jobs: int = 60
    dispatch_jobs: int = 200
    backlog: int = 10_000
    memory_baseline: bool = True
    scale_jobs: int = 60
    profile_s: float = 4.0
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))

    @classmethod
    def make(cls, quick: bool, pools: Sequence[str] | None = None) -> Config:
        if not quick:
            return cls(pools=tuple(pools or cls.pools))
        return cls(
            quick=True,
            reps=2,
            pools=tuple(pools or (DEFAULT_POOL,)),
            overhead_jobs=15,
            saturation_jobs=12,
            dispatch_jobs=30,
            backlog=300,
            memory_baseline=False,
            scale_jobs=8,
            profile_s=1.0,
        )


# --- helpers ---------------------------------------------------------------------------------


def fleet_job(producer: Producer, index: int) -> None:
    producer.generate(f"bench job {index}").get(timeout=_GET_TIMEOUT_S)


def fleet_burst(producer: Producer, jobs: int) -> float:
    """Seconds from the first publish to the last result of ``jobs`` generations."""
    start = time.perf_counter()
    handles = [producer.generate(f"bench burst {i}") for i in range(jobs)]
    for handle in handles:
        handle.get(timeout=_GET_TIMEOUT_S)
    return time.perf_counter() - start


def noop_burst(app: Celery, jobs: int, confirm_timeout: float) -> float:
    start = time.perf_counter()
    task = app.tasks[NOOP_TASK]
    handles = [task.apply_async((i,), confirm_timeout=confirm_timeout) for i in range(jobs)]
    for handle in handles:
        handle.get(timeout=_GET_TIMEOUT_S)
    return time.perf_counter() - start


def parallel(calls: Sequence[Callable[[int], Any]], jobs: int) -> tuple[float, list[Any]]:
    """``jobs`` calls shared by one thread per entry of ``calls``: the seconds from the first
    to the last, and what each returned."""
    counter = itertools.count()
    returned: list[Any] = []
    errors: list[BaseException] = []

    def run(call: Callable[[int], Any]) -> None:
        try:
            while (index := next(counter)) < jobs:
                returned.append(call(index))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed, returned


def direct_burst(clients: Sequence[OllamaClient], jobs: int) -> float:
    """``jobs`` streamed generations over ``len(clients)`` concurrent clients."""
    calls = [lambda _, c=client: c.generate(MODEL, "bench direct") for client in clients]
    return parallel(calls, jobs)[0]


def warm_fleet(producer: Producer, concurrency: int) -> None:
    """Every pool process makes its clients and checks the model once, before timing."""
    fleet_burst(producer, concurrency * 3)
    for i in range(10):
        fleet_job(producer, i)


def alternate(reps: int, *runs: Callable[[int], None]) -> None:
    """Run each repetition of every contender, rotating who goes first."""
    for rep in range(reps):
        shift = rep % len(runs)
        for run in (*runs[shift:], *runs[:shift]):
            run(rep)


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _range(values: Sequence[float], digits: int = 2) -> str:
    low, high = spread(values)
    return f"{fmt(low, digits)}-{fmt(high, digits)}"


def noop_worker(env: BenchEnv, cfg: Config, pool: str, wait: bool = True) -> Worker:
    """A bare Celery worker on its own quorum queue."""
    return env.start_worker(
        app="bench.noop_app",
        pool=pool,
        concurrency=cfg.concurrency,
        queues=noop_queue(env.settings).name,
        wait=wait,
    )


def noop_app(env: BenchEnv, confirms: bool = True) -> Celery:
    """The harness's side of the no-op app, its queue declared."""
    app = make_app(env.settings)
    if not confirms:
        app.conf.broker_transport_options = {}
    with app.connection_for_write() as connection:
        noop_queue(env.settings)(connection.default_channel).declare()
    return app


@dataclass
class _Rates:
    """Jobs/s per repetition of a baseline and a contender, and how to name them."""

    base: list[float]
    mine: list[float]
    names: tuple[str, str]  # keys of ``extra``
    target: float
    digits: int = 2
    labels: tuple[str, str] | None = None  # columns of the repetitions; ``names`` if None


def _throughput(rates: _Rates, pool: str, **outcome: Any) -> Outcome:
    """An Outcome of one throughput ratio against its target, with the repetitions."""
    base, mine = median(rates.base), median(rates.mine)
    ratio = mine / base
    first, second = rates.names
    columns = rates.labels or rates.names
    digits = rates.digits
    return Outcome(
        rows=[
            Row(
                metric="throughput (jobs/s)",
                baseline=f"{fmt(base, digits)} ({_range(rates.base, digits)})",
                fleet=f"{fmt(mine, digits)} ({_range(rates.mine, digits)})",
                compared=f"x{fmt(ratio, 3)}",
                target=f"ratio >= {rates.target:g}",
                met=ratio >= rates.target,
            )
        ],
        reps=[
            {"rep": i + 1, f"{columns[0]} jobs/s": a, f"{columns[1]} jobs/s": b}
            for i, (a, b) in enumerate(zip(rates.base, rates.mine, strict=True))
        ],
        extra={"pool": pool, first: base, second: mine, "ratio": ratio},
        **outcome,
    )


def _fleet_worker(pool: str, cfg: Config) -> str:
    """How the fleet's worker was started, for the setup texts."""
    return (
        f"`AVOCADO_WORKER_POOL={pool} celery -A ollama_worker worker --pool {pool} "
        f"--concurrency {cfg.concurrency}`"
    )


# --- 1. overhead -----------------------------------------------------------------------------


def overhead(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Sequential jobs on an instant simulator: the fleet's latency on top of a direct call."""
    sim = env.start_sim(latency_ms=0, parallel=4)
    worker = env.start_worker(
        pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False
    )
    bare_worker = noop_worker(env, cfg, pool, wait=False)
    env.wait_ready(worker)
    env.wait_ready(bare_worker)
    noop = noop_app(env)
    producer = env.producer
    client = OllamaClient(sim.url)
    confirm = env.settings.publish_timeout_s
    latencies: dict[str, dict[int, list[float]]] = {"fleet": {}, "direct": {}, "noop": {}}

    def timed(name: str, call: Callable[[int], Any]) -> Callable[[int], None]:
        def run(rep: int) -> None:
            lat = latencies[name].setdefault(rep, [])
            for i in range(cfg.overhead_jobs):
                start = time.perf_counter()
                call(i)
                lat.append(_ms(time.perf_counter() - start))

        return run

    try:
        warm_fleet(producer, cfg.concurrency)
        noop_burst(noop, cfg.concurrency * 3, confirm)
        for _ in range(20):
            client.generate(MODEL, "warm")
        task = noop.tasks[NOOP_TASK]
        alternate(
            cfg.reps,
            timed("fleet", lambda i: fleet_job(producer, i)),
            timed("direct", lambda i: client.generate(MODEL, "bench direct")),
            timed(
                "noop",
                lambda i: task.apply_async((i,), confirm_timeout=confirm).get(
                    timeout=_GET_TIMEOUT_S
                ),
            ),
        )
    finally:
        client.close()
        noop.close()
        env.stop_worker(bare_worker)
        env.stop_worker(worker)
        sim.stop()
    fleet, direct, bare = latencies["fleet"], latencies["direct"], latencies["noop"]
    reps: list[dict[str, Any]] = [
        {
            "rep": rep + 1,
            "direct p50 ms": percentile(direct[rep], 50),
            "fleet p50 ms": percentile(fleet[rep], 50),
            "bare Celery p50 ms": percentile(bare[rep], 50),
            "direct p99 ms": percentile(direct[rep], 99),
            "fleet p99 ms": percentile(fleet[rep], 99),
            "bare Celery p99 ms": percentile(bare[rep], 99),
        }
        for rep in range(cfg.reps)
    ]

    def med(column: str) -> float:
        return median([r[column] for r in reps])

    rows = []
    for q, limit in ((50, 3.0), (99, 10.0)):
        base, mine = med(f"direct p{q} ms"), med(f"fleet p{q} ms")
        rows.append(
            Row(
                metric=f"p{q} latency (ms)",
                baseline=fmt(base),
                fleet=fmt(mine),
                compared=f"+{fmt(mine - base)} ms",
                target=f"difference <= {limit:g} ms",
                met=(mine - base) <= limit,
            )
        )
    every = {name: [x for rep in runs.values() for x in rep] for name, runs in latencies.items()}
    pooled = percentile(every["fleet"], 99) - percentile(every["direct"], 99)
    rows.append(
        Row(
            metric="p99 over all repetitions pooled (ms)",
            baseline=fmt(percentile(every["direct"], 99)),
            fleet=fmt(percentile(every["fleet"], 99)),
            compared=f"+{fmt(pooled)} ms",
            target="(information)",
        )
    )
    rows.append(
        Row(
            metric="floor: a bare Celery no-op round trip, p50 / p99 (ms), no Ollama call",
            baseline="-",
            fleet=f"{fmt(med('bare Celery p50 ms'))} / {fmt(med('bare Celery p99 ms'))}",
            compared="the least any Celery job adds here",
            target="(information)",
        )
    )
    return Outcome(
        key="1",
        title=f"1. Overhead ({pool}, concurrency {cfg.concurrency})",
        setup=(
            f"Simulator subprocess answering at once (24 tokens, streamed). {cfg.reps} "
            f"repetitions x {cfg.overhead_jobs} sequential jobs each, alternating. Baseline: "
            "the worker's own `OllamaClient` (one long-lived httpx client, streamed "
            "`/api/generate`). Fleet: `Producer.generate(...).get()` per job through RabbitMQ, "
            f"one {_fleet_worker(pool, cfg)}, Redis results, SQLite `ml_results`. Floor: a "
            "bare Celery no-op task (`bench/noop_app.py`, same broker, quorum queue, confirms "
            "and Redis backend, same pool) sent and waited for the same way: what any Celery "
            "job costs here before its work and before the fleet adds anything."
        ),
        baseline_name="direct httpx",
        fleet_name=f"fleet ({pool})",
        rows=rows,
        reps=reps,
        extra={
            "pool": pool,
            "direct50": med("direct p50 ms"),
            "fleet50": med("fleet p50 ms"),
            "bare50": med("bare Celery p50 ms"),
            "direct99": med("direct p99 ms"),
            "fleet99": med("fleet p99 ms"),
            "bare99": med("bare Celery p99 ms"),
        },
    )


# --- 2. saturation ---------------------------------------------------------------------------


JITTER_MS = 100.0
"""Scenario 2 again with generations of 100-300 ms: real answers do not end together."""


def saturation(env: BenchEnv, cfg: Config, pool: str, jitter_ms: float = 0.0) -> Outcome:
    """A simulator with 4 slots and 200 ms per generation: can the fleet keep it busy?"""
    sim = env.start_sim(latency_ms=200, parallel=4, jitter_ms=jitter_ms)
    worker = env.start_worker(pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url)
    producer = env.producer
    clients = [OllamaClient(sim.url) for _ in range(4)]
    jobs = cfg.saturation_jobs
    rates: dict[str, list[float]] = {"fleet": [], "direct": []}
    try:
        fleet_burst(producer, cfg.concurrency * 2)
        direct_burst(clients, 8)
        alternate(
            cfg.reps,
            lambda _: rates["fleet"].append(jobs / fleet_burst(producer, jobs)),
            lambda _: rates["direct"].append(jobs / direct_burst(clients, jobs)),
        )
    finally:
        for client in clients:
            client.close()
        env.stop_worker(worker)
        sim.stop()
    outcome = _throughput(
        _Rates(rates["direct"], rates["fleet"], ("direct", "fleet"), target=0.95),
        pool,
        key="2j" if jitter_ms else "2",
        title=(
            f"2. Saturation, generations of {200 - jitter_ms:g}-{200 + jitter_ms:g} ms "
            f"({pool}, concurrency {cfg.concurrency})"
            if jitter_ms
            else f"2. Saturation ({pool}, concurrency {cfg.concurrency})"
        ),
        setup=(
            "Simulator subprocess with 4 parallel slots and 200 ms per generation (ideal: "
            f"20 jobs/s). {cfg.reps} repetitions x {jobs} jobs, alternating. "
            + (
                f"Generation times spread evenly over {200 - jitter_ms:g}-"
                f"{200 + jitter_ms:g} ms (`--latency-jitter-ms {jitter_ms:g}`, a golden-ratio "
                "sequence, so both sides and every repetition see the same times), so jobs "
                "that start together do not end together; information beside scenario 2, "
                "which the target is measured on. "
                if jitter_ms
                else ""
            )
            + "Baseline: 4 threads, each with its own long-lived `OllamaClient`. Fleet: all jobs "
            "published with `Producer.generate`, then every result `.get()`; time from the "
            f"first publish to the last result; one worker {_fleet_worker(pool, cfg)}."
        ),
        baseline_name="direct httpx, 4 clients",
        fleet_name=f"fleet ({pool})",
    )
    if jitter_ms:  # the target is scenario 2's; this one explains it
        outcome.rows[0].target, outcome.rows[0].met = "(information)", None
    return outcome


# --- 3. dispatch -----------------------------------------------------------------------------


def dispatch(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """An instant simulator: fleet jobs/s against bare Celery no-op tasks, same broker setup."""
    sim = env.start_sim(latency_ms=0, parallel=4)
    noop = noop_app(env)
    workers = [
        env.start_worker(pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False),
        noop_worker(env, cfg, pool, wait=False),
    ]
    producer = env.producer
    confirm = env.settings.publish_timeout_s
    jobs = cfg.dispatch_jobs
    rates: dict[str, list[float]] = {"fleet": [], "bare": []}
    try:
        for worker in workers:
            env.wait_ready(worker)
        warm_fleet(producer, cfg.concurrency)
        noop_burst(noop, cfg.concurrency * 4, confirm)
        alternate(
            cfg.reps,
            lambda _: rates["fleet"].append(jobs / fleet_burst(producer, jobs)),
            lambda _: rates["bare"].append(jobs / noop_burst(noop, jobs, confirm)),
        )
    finally:
        for worker in workers:
            env.stop_worker(worker)
        noop.close()
        sim.stop()
    return _throughput(
        _Rates(
            rates["bare"],
            rates["fleet"],
            ("bare", "fleet"),
            target=0.7,
            digits=1,
            labels=("bare no-op", "fleet"),
        ),
        pool,
        key="3",
        title=f"3. Dispatch ({pool}, concurrency {cfg.concurrency})",
        setup=(
            f"Instant simulator. {cfg.reps} repetitions x {jobs} jobs, alternating; all published "
            "then all results fetched, time from the first publish to the last result. Baseline: "
            "bare Celery no-op task (`bench/noop_app.py`) on the same vhost, a quorum queue with "
            "the same arguments, publisher confirms, persistent delivery, late acks, prefetch 1, "
            "JSON, the same Redis result backend and key prefix; without task events, STARTED "
            "state and extended results (all three now off in the fleet too). Fleet: one worker "
            f"{_fleet_worker(pool, cfg)}; the no-op worker runs the same pool and concurrency."
        ),
        baseline_name="bare Celery no-op",
        fleet_name=f"fleet ({pool})",
    )


# --- 4. memory -------------------------------------------------------------------------------


@dataclass
class _Sample:
    t: float
    done: int
    rss: float
    pss: float
    uss: float
    processes: int


def _memory_mb(worker: Worker) -> tuple[float, float, float, int]:
    """RSS, PSS and USS summed over the worker's main process and pool children, in MB."""
    rss = pss = uss = 0.0
    procs = worker.processes()
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
        uss += getattr(info, "uss", 0)
    mb = 1024.0 * 1024.0
    return rss / mb, pss / mb, uss / mb, len(procs)


def _per_process(worker: Worker) -> list[str]:
    """RSS / PSS / USS of each process of the worker, in MB."""
    lines = []
    for index, proc in enumerate(worker.processes()):
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        mb = 1024.0 * 1024.0
        role = "main" if index == 0 else f"child {index}"
        lines.append(
            f"{role} {info.rss / mb:.0f} / {getattr(info, 'pss', 0) / mb:.0f} / "
            f"{getattr(info, 'uss', 0) / mb:.0f}"
        )
    return lines


def _publish_backlog(
    make_submit: Callable[[], tuple[Callable[[int], Any], Callable[[], None]]],
    count: int,
    threads: int = 2,
) -> tuple[list[Any], list[Callable[[], None]]]:
    """Publish ``count`` jobs from a few threads, each with a client of its own (a Celery
    app's result consumer is not thread-safe). Returns the handles and the clients' closers,
    to call once the handles were waited on."""
    handles: list[Any] = [None] * count
    counter = itertools.count()
    closers: list[Callable[[], None]] = []
    errors: list[BaseException] = []

    def run(submit: Callable[[int], Any]) -> None:
        try:
            while (i := next(counter)) < count:
                handles[i] = submit(i)
        except BaseException as error:
            errors.append(error)

    runners = []
    for _ in range(threads):
        submit, close = make_submit()
        closers.append(close)
        runners.append(threading.Thread(target=run, args=(submit,)))
    for thread in runners:
        thread.start()
    for thread in runners:
        thread.join()
    if errors:
        for close in closers:
            close()
        raise errors[0]
    return handles, closers


def _fleet_backlog_client(env: BenchEnv) -> tuple[Callable[[int], Any], Callable[[], None]]:
    """A producer that publishes without waiting for confirms: a backlog fills fast, and the
    queue depth is checked before the worker starts."""
    made = Producer(env.make_settings())
    made.app.conf.broker_transport_options = {}
    return (lambda i: made.generate(f"backlog job {i}")), made.close


def _noop_backlog_client(env: BenchEnv) -> tuple[Callable[[int], Any], Callable[[], None]]:
    app = noop_app(env, confirms=False)
    task = app.tasks[NOOP_TASK]
    return (lambda i: task.apply_async((i,))), app.close


def _fill(
    env: BenchEnv,
    make_submit: Callable[[], tuple[Callable[[int], Any], Callable[[], None]]],
    queue: str,
    count: int,
) -> tuple[list[Any], list[Callable[[], None]], float]:
    start = time.perf_counter()
    handles, closers = _publish_backlog(make_submit, count)
    try:
        wait_for(lambda: env.queue_depth(queue) >= count, 120, f"{count} messages in {queue}")
    except BaseException:
        for close in closers:
            close()
        raise
    return handles, closers, time.perf_counter() - start


def _drain(
    env: BenchEnv,
    worker_factory: Callable[[], Worker],
    queue: str,
    backlog: int,
    tail: Sequence[Any],
    breakdown: list[str] | None = None,
    interval: float = 0.5,
) -> tuple[list[_Sample], float]:
    """Start the worker on a full queue, sample its memory until the queue is empty."""
    worker = worker_factory()
    start = time.perf_counter()
    samples: list[_Sample] = []
    try:
        while True:
            depth = env.queue_depth(queue)
            rss, pss, uss, count = _memory_mb(worker)
            now = time.perf_counter() - start
            if count:
                samples.append(_Sample(now, backlog - depth, rss, pss, uss, count))
            if depth == 0:
                break
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker exited while draining:\n{worker.log_tail()}")
            time.sleep(interval)
        for handle in tail:
            handle.get(timeout=_GET_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        rss, pss, uss, count = _memory_mb(worker)
        samples.append(_Sample(elapsed, backlog, rss, pss, uss, count))
        if breakdown is not None:
            breakdown.extend(_per_process(worker))
    finally:
        env.stop_worker(worker)
    return samples, elapsed


def _memory_figures(samples: list[_Sample], backlog: int) -> dict[str, float]:
    """Total memory once warm (5% of the backlog done), at the end, and at its highest."""
    warm_at = max(1, backlog // 20)
    warm = next((s for s in samples if s.done >= warm_at), samples[-1])
    after = [s for s in samples if s.t >= warm.t]
    end = samples[-1]
    peak = max(after, key=lambda s: s.rss)
    return {
        "first_rss": samples[0].rss,
        "warm_rss": warm.rss,
        "end_rss": end.rss,
        "peak_rss": max(s.rss for s in samples),
        "growth_pct": 100.0 * (peak.rss - warm.rss) / warm.rss,
        "end_growth_pct": 100.0 * (end.rss - warm.rss) / warm.rss,
        "warm_pss": warm.pss,
        "end_pss": end.pss,
        "peak_pss": max(s.pss for s in samples),
        "warm_uss": warm.uss,
        "end_uss": end.uss,
        "pss_growth_pct": 100.0 * (end.pss - warm.pss) / warm.pss if warm.pss else 0.0,
        "processes": float(end.processes),
    }


def memory(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """One node at concurrency 4 drains a backlog; its memory must stay small and flat."""
    backlog = cfg.backlog
    sim = env.start_sim(latency_ms=0, parallel=4)
    env.purge_results()
    closers: list[Callable[[], None]] = []
    breakdown: list[str] = []
    base_samples: list[_Sample] = []
    base_s = 0.0
    try:
        handles, closers, publish_s = _fill(
            env, lambda: _fleet_backlog_client(env), "ml.generate", backlog
        )
        cfg.log(f"  {backlog} jobs queued in {publish_s:.1f}s; starting the {pool} worker")
        fleet_samples, fleet_s = _drain(
            env,
            lambda: env.start_worker(
                pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False
            ),
            "ml.generate",
            backlog,
            handles[-2 * cfg.concurrency :],
            breakdown,
        )
        for close in closers:
            close()
        closers = []
        if cfg.memory_baseline:
            queue = noop_queue(env.settings).name
            noop_handles, closers, _ = _fill(env, lambda: _noop_backlog_client(env), queue, backlog)
            base_samples, base_s = _drain(
                env,
                lambda: noop_worker(env, cfg, pool, wait=False),
                queue,
                backlog,
                noop_handles[-2 * cfg.concurrency :],
            )
    finally:
        for close in closers:
            close()
        sim.stop()
        env.purge_results()
    mine = _memory_figures(fleet_samples, backlog)
    base = _memory_figures(base_samples, backlog) if base_samples else None

    def b(name: str, digits: int = 1) -> str:
        return fmt(base[name], digits) if base else "not run"

    rows = [
        Row(
            metric="RSS, main + pool children, at the end (MB)",
            baseline=b("end_rss"),
            fleet=fmt(mine["end_rss"], 1),
            compared=f"x{fmt(mine['end_rss'] / base['end_rss'], 2)}" if base else "",
            target="fleet <= 250 MB",
            met=mine["peak_rss"] <= 250.0,
        ),
        Row(
            metric="RSS at its highest (MB)",
            baseline=b("peak_rss"),
            fleet=fmt(mine["peak_rss"], 1),
            compared="",
            target="fleet <= 250 MB",
            met=mine["peak_rss"] <= 250.0,
        ),
        Row(
            metric="RSS growth, warm (5% drained) to highest (%)",
            baseline=b("growth_pct"),
            fleet=fmt(mine["growth_pct"], 1),
            compared="",
            target="fleet <= 10%",
            met=mine["growth_pct"] <= 10.0,
        ),
        Row(
            metric="PSS at the end (MB; shared pages split between processes)",
            baseline=b("end_pss"),
            fleet=fmt(mine["end_pss"], 1),
            compared="",
            target="(information)",
        ),
        Row(
            metric="USS at the end (MB; pages only that process has)",
            baseline=b("end_uss"),
            fleet=fmt(mine["end_uss"], 1),
            compared="",
            target="(information)",
        ),
        Row(
            metric="drain rate (jobs/s, incl. worker start)",
            baseline=fmt(backlog / base_s, 1) if base else "not run",
            fleet=fmt(backlog / fleet_s, 1),
            compared="",
            target="(information)",
        ),
    ]
    series = [
        {"t s": s.t, "done": s.done, "rss MB": s.rss, "pss MB": s.pss, "uss MB": s.uss}
        for s in fleet_samples
    ]
    return Outcome(
        key="4",
        title=f"4. Memory ({pool}, concurrency {cfg.concurrency})",
        setup=(
            f"{backlog} jobs queued first ({publish_s:.1f} s), then one worker "
            f"{_fleet_worker(pool, cfg)} started on an instant "
            "simulator; psutil samples RSS, PSS and USS of the main process plus its pool "
            "children every 0.5 s until the queue is empty and the last jobs' results are in. "
            "Baseline: the bare Celery no-op worker, same pool and concurrency, draining as many "
            "no-op tasks. RSS counts a page shared by forked children once per process; PSS "
            "splits it, so the PSS sum is the memory the node really holds."
        ),
        baseline_name="bare Celery no-op worker",
        fleet_name=f"fleet ({pool})",
        rows=rows,
        reps=_thin(series, 12),
        notes=[
            f"Samples: {len(fleet_samples)} over {fleet_s:.0f} s. At the end, RSS / PSS / USS "
            f"per process (MB): {'; '.join(breakdown)}."
        ],
        extra={
            "pool": pool,
            **{f"fleet_{k}": v for k, v in mine.items()},
            **{f"base_{k}": v for k, v in (base or {}).items()},
            "fleet_rate": backlog / fleet_s,
            **({"base_rate": backlog / base_s} if base else {}),
        },
    )


def _thin(series: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    if len(series) <= keep:
        return series
    step = (len(series) - 1) / (keep - 1)
    return [series[round(i * step)] for i in range(keep)]


# --- 5. scale-out ----------------------------------------------------------------------------


def scale_out(env: BenchEnv, cfg: Config) -> Outcome:
    """Two nodes, each a worker with its own simulator, against one node of scenario 2."""
    pool = cfg.default_pool
    sims = [env.start_sim(latency_ms=200, parallel=4) for _ in range(2)]
    workers = [
        env.start_worker(pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False)
        for sim in sims
    ]
    for worker in workers:
        env.wait_ready(worker)
    producer = env.producer
    second = workers[1]
    one: list[float] = []
    two: list[float] = []
    jobs = cfg.scale_jobs
    try:
        fleet_burst(producer, cfg.concurrency * 4)
        env.control(second, "cancel_consumer", queue="ml.generate")

        def one_node(_: int) -> None:
            one.append(jobs / fleet_burst(producer, jobs))

        def two_nodes(_: int) -> None:
            env.control(second, "add_consumer", queue="ml.generate")
            try:
                two.append(2 * jobs / fleet_burst(producer, 2 * jobs))
            finally:
                env.control(second, "cancel_consumer", queue="ml.generate")

        alternate(cfg.reps, one_node, two_nodes)
    finally:
        for worker in workers:
            env.stop_worker(worker)
        for sim in sims:
            sim.stop()
    return _throughput(
        _Rates(one, two, ("one", "two"), target=1.8, labels=("one node", "two nodes")),
        pool,
        key="5",
        title=f"5. Scale-out ({pool}, concurrency {cfg.concurrency} per node)",
        setup=(
            "Two nodes, each one worker with its own simulator subprocess (4 slots, 200 ms), "
            f"against one node as in scenario 2. {cfg.reps} repetitions, alternating; one node "
            f"runs {jobs} jobs, two nodes {2 * jobs} (same duration). The second worker stays "
            "up and is switched with the `cancel_consumer` / `add_consumer` remote controls."
        ),
        baseline_name="one node",
        fleet_name="two nodes",
    )
