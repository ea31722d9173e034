"""The five scenarios of issue 6, each run against its baseline in the same run, alternating."""

from __future__ import annotations

import itertools
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
from celery import Celery

from avocado_shared import Producer
from bench.noop_app import NOOP_TASK, make_app, noop_queue
from bench.outcome import Outcome, Row
from bench.services import MODEL, BenchEnv, Worker, wait_for
from bench.stats import fmt, median, percentile, spread
from ollama_worker.ollama import OllamaClient

__all__ = [
    "Config",
    "dispatch",
    "memory",
    "overhead",
    "saturation",
    "scale_out",
]

_GET_TIMEOUT_S = 300.0


@dataclass
class Config:
    """Sizes of one run; ``quick`` shrinks every one of them."""

    quick: bool = False
    reps: int = 5
    concurrency: int = 4
    pools: Sequence[str] = ("prefork", "threads")
    default_pool: str = "prefork"
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
            pools=tuple(pools or ("prefork",)),
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


def direct_burst(clients: Sequence[OllamaClient], jobs: int) -> float:
    """``jobs`` streamed generations over ``len(clients)`` concurrent clients."""
    counter = itertools.count()
    errors: list[BaseException] = []

    def run(client: OllamaClient) -> None:
        try:
            while next(counter) < jobs:
                client.generate(MODEL, "bench direct")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


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


def noop_worker(
    env: BenchEnv, cfg: Config, pool: str, fleet_config: bool, wait: bool = True
) -> Worker:
    """A bare Celery worker (or one under the fleet's config) on its own quorum queue."""
    return env.start_worker(
        app="bench.noop_app",
        pool=pool,
        concurrency=cfg.concurrency,
        queues=noop_queue(fleet_config, env.settings).name,
        env={"BENCH_NOOP_FLEET_CONFIG": "1" if fleet_config else "0"},
        wait=wait,
    )


def noop_app(env: BenchEnv, fleet_config: bool = False, confirms: bool = True) -> Celery:
    """The harness's side of the no-op app, its queue declared."""
    app = make_app(env.settings, fleet_config=fleet_config)
    if not confirms:
        app.conf.broker_transport_options = {}
    with app.connection_for_write() as connection:
        noop_queue(fleet_config, env.settings)(connection.default_channel).declare()
    return app


FIXES = "events,tracking,startrow,sqlite"
"""The four fixes BENCHMARKS.md recommends, applied from outside by ``bench/fleet_app.py``."""


class Fixed:
    """The fleet with fixes 1-4 applied, beside the unchanged worker on the same simulator.

    Only one of the two consumes ``ml.generate`` at a time (``use``), switched with the
    ``cancel_consumer`` / ``add_consumer`` remote controls.
    """

    def __init__(self, env: BenchEnv, cfg: Config, pool: str, ollama_url: str) -> None:
        self.env = env
        self.cfg = cfg
        self.worker = env.start_worker(
            app="bench.fleet_app",
            pool=pool,
            concurrency=cfg.concurrency,
            ollama_url=ollama_url,
            queues=f"bench.idle.{uuid.uuid4().hex[:6]}",
            env={"BENCH_FIXES": FIXES},
            wait=False,
        )
        self.producer = Producer(env.make_settings())
        self.producer.app.conf.task_send_sent_event = False  # fix 1, producer side
        self.unchanged: Worker | None = None
        self.active = False
        self.warm = False

    def use(self, fixed: bool) -> Producer:
        """Let the fixed (or the unchanged) worker take the jobs; its producer."""
        assert self.unchanged is not None
        if fixed != self.active:
            off, on = (self.unchanged, self.worker) if fixed else (self.worker, self.unchanged)
            self.env.control(off, "cancel_consumer", queue="ml.generate")
            self.env.control(on, "add_consumer", queue="ml.generate")
            self.active = fixed
        if fixed and not self.warm:
            self.warm = True
            warm_fleet(self.producer, self.cfg.concurrency)
        return self.producer if fixed else self.env.producer

    def ready(self, unchanged: Worker) -> None:
        self.unchanged = unchanged
        self.env.wait_ready(self.worker)

    def close(self) -> None:
        self.env.stop_worker(self.worker)
        self.producer.close()


def _fixed(env: BenchEnv, cfg: Config, pool: str, ollama_url: str) -> Fixed | None:
    """The fixed contender, in full runs on the default pool only."""
    if cfg.quick or pool != cfg.default_pool:
        return None
    return Fixed(env, cfg, pool, ollama_url)


_FIXED_NOTE = (
    "Fleet + fixes: the same worker with the four fixes recommended below applied from "
    "outside (`bench/fleet_app.py`, `BENCH_FIXES=events,tracking,startrow,sqlite`), in the "
    "same rotation."
)


# --- 1. overhead -----------------------------------------------------------------------------


def overhead(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Sequential jobs on an instant simulator: the fleet's latency on top of a direct call."""
    sim = env.start_sim(latency_ms=0, parallel=4)
    worker = env.start_worker(
        pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False
    )
    bare_worker = noop_worker(env, cfg, pool, fleet_config=False, wait=False)
    fixed = _fixed(env, cfg, pool, sim.url)
    env.wait_ready(worker)
    env.wait_ready(bare_worker)
    if fixed is not None:
        fixed.ready(worker)
    noop = noop_app(env)
    producer = env.producer
    client = OllamaClient(sim.url)
    confirm = env.settings.publish_timeout_s
    latencies: dict[str, dict[int, list[float]]] = {
        "fleet": {},
        "direct": {},
        "noop": {},
        "fixed": {},
    }

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
        runs = [
            timed("fleet", lambda i: fleet_job(fixed.use(False) if fixed else producer, i)),
            timed("direct", lambda i: client.generate(MODEL, "bench direct")),
            timed(
                "noop",
                lambda i: task.apply_async((i,), confirm_timeout=confirm).get(
                    timeout=_GET_TIMEOUT_S
                ),
            ),
        ]
        if fixed is not None:
            runs.append(timed("fixed", lambda i: fleet_job(fixed.use(True), i)))
        alternate(cfg.reps, *runs)
    finally:
        client.close()
        noop.close()
        if fixed is not None:
            fixed.close()
        env.stop_worker(bare_worker)
        env.stop_worker(worker)
        sim.stop()
    fleet, direct, bare = latencies["fleet"], latencies["direct"], latencies["noop"]
    fixed_runs = latencies["fixed"]
    reps: list[dict[str, Any]] = []
    for rep in range(cfg.reps):
        row = {
            "rep": rep + 1,
            "direct p50 ms": percentile(direct[rep], 50),
            "fleet p50 ms": percentile(fleet[rep], 50),
            "bare Celery p50 ms": percentile(bare[rep], 50),
            "direct p99 ms": percentile(direct[rep], 99),
            "fleet p99 ms": percentile(fleet[rep], 99),
            "bare Celery p99 ms": percentile(bare[rep], 99),
        }
        if fixed_runs:
            row["fleet + fixes p50 ms"] = percentile(fixed_runs[rep], 50)
            row["fleet + fixes p99 ms"] = percentile(fixed_runs[rep], 99)
        reps.append(row)

    def med(column: str) -> float:
        return median([r[column] for r in reps])

    rows = []
    for q, limit in ((50, 3.0), (99, 10.0)):
        base = med(f"direct p{q} ms")
        for label, column in (("", "fleet"), (" with fixes 1-4", "fleet + fixes")):
            if f"{column} p{q} ms" not in reps[0]:
                continue
            mine = med(f"{column} p{q} ms")
            rows.append(
                Row(
                    metric=f"p{q} latency (ms){label}",
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
    extra = {
        "pool": pool,
        "direct50": med("direct p50 ms"),
        "fleet50": med("fleet p50 ms"),
        "bare50": med("bare Celery p50 ms"),
        "direct99": med("direct p99 ms"),
        "fleet99": med("fleet p99 ms"),
        "bare99": med("bare Celery p99 ms"),
    }
    if fixed_runs:
        extra["fixed50"] = med("fleet + fixes p50 ms")
        extra["fixed99"] = med("fleet + fixes p99 ms")
    return Outcome(
        key="1",
        title=f"1. Overhead ({pool}, concurrency {cfg.concurrency})",
        setup=(
            f"Simulator subprocess answering at once (24 tokens, streamed). {cfg.reps} "
            f"repetitions x {cfg.overhead_jobs} sequential jobs each, alternating. Baseline: "
            "the worker's own `OllamaClient` (one long-lived httpx client, streamed "
            "`/api/generate`). Fleet: `Producer.generate(...).get()` per job through RabbitMQ, "
            f"one `celery -A ollama_worker worker --pool {pool} --concurrency "
            f"{cfg.concurrency}`, Redis results, SQLite `ml_results`. Floor: a bare Celery "
            "no-op task (`bench/noop_app.py`, same broker, quorum queue, confirms and Redis "
            "backend, same pool) sent and waited for the same way: what any Celery job costs "
            "here before its work and before the fleet adds anything."
            + (f" {_FIXED_NOTE}" if fixed_runs else "")
        ),
        baseline_name="direct httpx",
        fleet_name=f"fleet ({pool})",
        rows=rows,
        reps=reps,
        extra=extra,
    )


# --- 2. saturation ---------------------------------------------------------------------------


def saturation(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """A simulator with 4 slots and 200 ms per generation: can the fleet keep it busy?"""
    sim = env.start_sim(latency_ms=200, parallel=4)
    worker = env.start_worker(
        pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False
    )
    fixed = _fixed(env, cfg, pool, sim.url)
    env.wait_ready(worker)
    if fixed is not None:
        fixed.ready(worker)
    producer = env.producer
    clients = [OllamaClient(sim.url) for _ in range(4)]
    jobs = cfg.saturation_jobs
    rates: dict[str, list[float]] = {"fleet": [], "direct": [], "fixed": []}
    try:
        fleet_burst(producer, cfg.concurrency * 2)
        direct_burst(clients, 8)
        runs = [
            lambda _: rates["fleet"].append(
                jobs / fleet_burst(fixed.use(False) if fixed else producer, jobs)
            ),
            lambda _: rates["direct"].append(jobs / direct_burst(clients, jobs)),
        ]
        if fixed is not None:
            runs.append(lambda _: rates["fixed"].append(jobs / fleet_burst(fixed.use(True), jobs)))
        alternate(cfg.reps, *runs)
    finally:
        for client in clients:
            client.close()
        if fixed is not None:
            fixed.close()
        env.stop_worker(worker)
        sim.stop()
    base, mine = median(rates["direct"]), median(rates["fleet"])
    ratio = mine / base
    rows = [
        Row(
            metric="throughput (jobs/s)",
            baseline=f"{fmt(base)} ({_range(rates['direct'])})",
            fleet=f"{fmt(mine)} ({_range(rates['fleet'])})",
            compared=f"x{fmt(ratio, 3)}",
            target="ratio >= 0.95",
            met=ratio >= 0.95,
        )
    ]
    extra: dict[str, Any] = {"pool": pool, "fleet": mine, "direct": base, "ratio": ratio}
    if rates["fixed"]:
        fixed_rate = median(rates["fixed"])
        rows.append(
            Row(
                metric="throughput with fixes 1-4 (jobs/s)",
                baseline=fmt(base),
                fleet=f"{fmt(fixed_rate)} ({_range(rates['fixed'])})",
                compared=f"x{fmt(fixed_rate / base, 3)}",
                target="ratio >= 0.95",
                met=fixed_rate / base >= 0.95,
            )
        )
        extra["fixed"] = fixed_rate
        extra["fixed_ratio"] = fixed_rate / base
    reps = []
    for i in range(cfg.reps):
        row = {"rep": i + 1, "direct jobs/s": rates["direct"][i], "fleet jobs/s": rates["fleet"][i]}
        if rates["fixed"]:
            row["fleet + fixes jobs/s"] = rates["fixed"][i]
        reps.append(row)
    return Outcome(
        key="2",
        title=f"2. Saturation ({pool}, concurrency {cfg.concurrency})",
        setup=(
            "Simulator subprocess with 4 parallel slots and 200 ms per generation (ideal: "
            f"20 jobs/s). {cfg.reps} repetitions x {jobs} jobs, alternating. "
            "Baseline: 4 threads, each with its own long-lived `OllamaClient`. Fleet: all jobs "
            "published with `Producer.generate`, then every result `.get()`; time from the "
            f"first publish to the last result; one worker `--pool {pool} --concurrency "
            f"{cfg.concurrency}`." + (f" {_FIXED_NOTE}" if rates["fixed"] else "")
        ),
        baseline_name="direct httpx, 4 clients",
        fleet_name=f"fleet ({pool})",
        rows=rows,
        reps=reps,
        extra=extra,
    )


# --- 3. dispatch -----------------------------------------------------------------------------


def dispatch(env: BenchEnv, cfg: Config) -> Outcome:
    """An instant simulator: fleet jobs/s against bare Celery no-op tasks, same broker setup."""
    pool = cfg.default_pool
    sim = env.start_sim(latency_ms=0, parallel=4)
    apps = {False: noop_app(env), True: noop_app(env, fleet_config=True)}
    workers: list[Worker] = []
    producer = env.producer
    confirm = env.settings.publish_timeout_s
    fixed: Fixed | None = None
    jobs = cfg.dispatch_jobs
    rates: dict[str, list[float]] = {"fleet": [], "bare": [], "fleet-config": [], "fixed": []}
    try:
        workers.append(
            env.start_worker(pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False)
        )
        workers += [noop_worker(env, cfg, pool, config, wait=False) for config in apps]
        fixed = _fixed(env, cfg, pool, sim.url)
        for worker in workers:
            env.wait_ready(worker)
        if fixed is not None:
            fixed.ready(workers[0])
        warm_fleet(producer, cfg.concurrency)
        for app in apps.values():
            noop_burst(app, cfg.concurrency * 4, confirm)
        runs = [
            lambda _: rates["fleet"].append(
                jobs / fleet_burst(fixed.use(False) if fixed else producer, jobs)
            ),
            lambda _: rates["bare"].append(jobs / noop_burst(apps[False], jobs, confirm)),
            lambda _: rates["fleet-config"].append(jobs / noop_burst(apps[True], jobs, confirm)),
        ]
        if fixed is not None:
            runs.append(lambda _: rates["fixed"].append(jobs / fleet_burst(fixed.use(True), jobs)))
        alternate(cfg.reps, *runs)
    finally:
        if fixed is not None:
            fixed.close()
        for worker in workers:
            env.stop_worker(worker)
        for app in apps.values():
            app.close()
        sim.stop()
    base, mine, mid = median(rates["bare"]), median(rates["fleet"]), median(rates["fleet-config"])
    ratio = mine / base
    rows = [
        Row(
            metric="throughput (jobs/s)",
            baseline=f"{fmt(base, 1)} ({_range(rates['bare'], 1)})",
            fleet=f"{fmt(mine, 1)} ({_range(rates['fleet'], 1)})",
            compared=f"x{fmt(ratio, 3)}",
            target="ratio >= 0.7",
            met=ratio >= 0.7,
        )
    ]
    extra: dict[str, Any] = {"pool": pool, "fleet": mine, "bare": base, "fleet_config": mid}
    if rates["fixed"]:
        fixed_rate = median(rates["fixed"])
        rows.append(
            Row(
                metric="throughput with fixes 1-4 (jobs/s)",
                baseline=fmt(base, 1),
                fleet=f"{fmt(fixed_rate, 1)} ({_range(rates['fixed'], 1)})",
                compared=f"x{fmt(fixed_rate / base, 3)}",
                target="ratio >= 0.7",
                met=fixed_rate / base >= 0.7,
            )
        )
        extra["fixed"] = fixed_rate
    rows.append(
        Row(
            metric="no-op under the fleet's whole Celery config (jobs/s)",
            baseline=fmt(base, 1),
            fleet=f"{fmt(mid, 1)} ({_range(rates['fleet-config'], 1)})",
            compared=f"x{fmt(mid / base, 3)}",
            target="(information)",
        )
    )
    reps = []
    for i in range(cfg.reps):
        row = {
            "rep": i + 1,
            "bare no-op jobs/s": rates["bare"][i],
            "no-op + fleet config jobs/s": rates["fleet-config"][i],
            "fleet jobs/s": rates["fleet"][i],
        }
        if rates["fixed"]:
            row["fleet + fixes jobs/s"] = rates["fixed"][i]
        reps.append(row)
    return Outcome(
        key="3",
        title=f"3. Dispatch ({pool}, concurrency {cfg.concurrency})",
        setup=(
            f"Instant simulator. {cfg.reps} repetitions x {jobs} jobs, alternating; all published "
            "then all results fetched, time from the first publish to the last result. Baseline: "
            "bare Celery no-op task (`bench/noop_app.py`) on the same vhost, a quorum queue with "
            "the same arguments, publisher confirms, persistent delivery, late acks, prefetch 1, "
            "JSON, the same Redis result backend and key prefix; without task events, STARTED "
            "state and extended results. Also shown: the same no-op task under the fleet's whole "
            f"Celery configuration. Every worker `--pool {pool} --concurrency {cfg.concurrency}`."
            + (f" {_FIXED_NOTE}" if rates["fixed"] else "")
        ),
        baseline_name="bare Celery no-op",
        fleet_name=f"fleet ({pool})",
        rows=rows,
        reps=reps,
        extra=extra,
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
        if cfg.memory_baseline and pool == cfg.default_pool:
            queue = noop_queue(False, env.settings).name
            noop_handles, closers, _ = _fill(env, lambda: _noop_backlog_client(env), queue, backlog)
            base_samples, base_s = _drain(
                env,
                lambda: env.start_worker(
                    app="bench.noop_app",
                    pool=pool,
                    concurrency=cfg.concurrency,
                    queues=queue,
                    env={"BENCH_NOOP_FLEET_CONFIG": "0"},
                    wait=False,
                ),
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
            f"{backlog} jobs queued first ({publish_s:.1f} s), then one "
            f"worker `--pool {pool} --concurrency {cfg.concurrency}` started on an instant "
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
    base, mine = median(one), median(two)
    ratio = mine / base
    return Outcome(
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
        rows=[
            Row(
                metric="throughput (jobs/s)",
                baseline=f"{fmt(base)} ({_range(one)})",
                fleet=f"{fmt(mine)} ({_range(two)})",
                compared=f"x{fmt(ratio, 3)}",
                target="ratio >= 1.8",
                met=ratio >= 1.8,
            )
        ],
        reps=[
            {"rep": i + 1, "one node jobs/s": a, "two nodes jobs/s": b}
            for i, (a, b) in enumerate(zip(one, two, strict=True))
        ],
        extra={"pool": pool, "one": base, "two": mine, "ratio": ratio},
    )
