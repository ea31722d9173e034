"""The five scenarios of issue 6, each run against its baseline in the same run, alternating."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, get_args

import psutil

from avocado_shared import Producer
from bench.noop_app import NOOP_TASK, make_app, noop_queue
from bench.report import Outcome, Row, fmt, median, percentile, span
from bench.services import JOB_QUEUE, MODEL, BenchEnv, process_tree
from ollama_worker.ollama import OllamaClient
from ollama_worker.settings import WorkerSettings
from tests.processes import Server, WorkerProcess, wait_for

__all__ = ["DEFAULT_POOL", "POOLS", "Config", "dispatch", "memory", "overhead", "saturation"]
__all__ += ["scale_out"]

Submit = Callable[[int], Any]
"""Publishes job ``i``; what it returns has ``.get(timeout=...)``."""
_Runs = dict[str, Callable[[], float]]  # jobs/s of one repetition, by side
_GET_TIMEOUT_S = 300.0
_POOL_FIELD = WorkerSettings.model_fields["worker_pool"]
DEFAULT_POOL: str = _POOL_FIELD.default
"""The worker's default pool (``AVOCADO_WORKER_POOL``), the one every single-pool part runs."""
POOLS = (DEFAULT_POOL, *(p for p in get_args(_POOL_FIELD.annotation) if p != DEFAULT_POOL))
JITTER_MS = 100.0
"""Scenario 2 again with generations of 100-300 ms: real answers do not end together."""


@dataclass
class Config:
    """Sizes of one run; the template cites them as ``{{name}}``."""

    reps: int = 5
    concurrency: int = 4
    pools: tuple[str, ...] = POOLS
    overhead_jobs: int = 120
    saturation_jobs: int = 60
    dispatch_jobs: int = 200
    backlog: int = 10_000
    memory_baseline: bool = True
    scale_jobs: int = 60
    real_jobs: int = 10
    real_burst: int = 10
    profile_s: float = 4.0
    cpu_seq: int = 150
    cpu_burst: int = 300
    producer_jobs: int = 200
    wire_jobs: int = 100
    lock_jobs: int = 50
    lock_latency_jobs: int = 40
    micro_calls: int = 300
    fix_seq: int = 50
    fix_burst: int = 120
    gateway_rate: float = 50.0
    gateway_jobs: int = 40
    gateway_burst: int = 160
    mix_jobs: int = 60
    lane_backlog: int = 200
    lane_jobs: int = 10
    cutoff_s: float = 60.0
    drain_job_s: float = 20.0
    drain_jobs: int = 6
    streams_jobs: int = 96
    embed_batch: int = 512
    embed_single: int = 200
    batch_lines: int = 10_000
    batch_latency_ms: float = 50.0
    batch_reps: int = 3
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))

    @classmethod
    def make(cls, quick: bool, pools: Sequence[str] | None = None) -> Config:
        """The full run's sizes, or with ``quick`` a smoke run's."""
        cfg = replace(cls(), pools=(DEFAULT_POOL,), **_QUICK) if quick else cls()
        return replace(cfg, pools=tuple(pools)) if pools else cfg


_QUICK: dict[str, Any] = {
    **{"reps": 2, "overhead_jobs": 15, "saturation_jobs": 12, "dispatch_jobs": 30},
    **{"backlog": 300, "memory_baseline": False, "scale_jobs": 8, "real_jobs": 2},
    **{"real_burst": 4, "profile_s": 1.0, "cpu_seq": 30, "cpu_burst": 60, "wire_jobs": 15},
    **{"producer_jobs": 40, "lock_jobs": 10, "lock_latency_jobs": 15, "micro_calls": 30},
    **{"fix_seq": 30, "fix_burst": 60, "gateway_jobs": 10, "gateway_burst": 32},
    **{"mix_jobs": 15, "lane_backlog": 60, "lane_jobs": 5},
    **{"cutoff_s": 15.0, "drain_job_s": 4.0, "drain_jobs": 6, "streams_jobs": 32},
    **{"embed_batch": 128, "embed_single": 30, "batch_lines": 1000, "batch_reps": 2},
}


def fleet(producer: Producer) -> Submit:
    return lambda i: producer.generate(f"bench job {i}")


def bare(env: BenchEnv, confirms: bool = True) -> Submit:
    """Publishes bare Celery no-op tasks to their declared queue; closed with the scenario."""
    app = env.closing(make_app(env.settings))
    if not confirms:
        app.conf.broker_transport_options = {}
    with app.connection_for_write() as connection:
        noop_queue(env.settings)(connection.default_channel).declare()
    task, confirm = app.tasks[NOOP_TASK], env.settings.publish_timeout_s if confirms else None
    return lambda i: task.apply_async((i,), confirm_timeout=confirm)


def done(submit: Submit) -> Callable[[int], Any]:
    """Job ``i`` published and its result waited for."""
    return lambda i: submit(i).get(timeout=_GET_TIMEOUT_S)


def timed_ms(call: Callable[[int], Any], jobs: int) -> list[float]:
    """Milliseconds of each of ``jobs`` sequential calls."""
    times = []
    for i in range(jobs):
        start = time.perf_counter()
        call(i)
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def burst(submit: Submit, jobs: int) -> float:
    """Seconds from the first publish to the last result of ``jobs`` jobs."""
    start = time.perf_counter()
    for handle in [submit(i) for i in range(jobs)]:
        handle.get(timeout=_GET_TIMEOUT_S)
    return time.perf_counter() - start


def parallel(calls: Sequence[Callable[[int], Any]], jobs: int) -> tuple[float, list[Any]]:
    """Jobs ``0..jobs-1`` shared by a thread per call: the seconds taken, what each returned."""
    counter, returned = itertools.count(), [None] * jobs

    def run(call: Callable[[int], Any]) -> None:
        for i in itertools.takewhile(lambda i: i < jobs, counter):
            returned[i] = call(i)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(run, calls))  # raises what a thread raised
    return time.perf_counter() - start, returned


def warm(submit: Submit, concurrency: int) -> None:
    """Every pool process makes its clients and checks the model once, before timing."""
    burst(submit, concurrency * 3)
    timed_ms(done(submit), 10)


def alternate(reps: int, *runs: Callable[[int], object]) -> None:
    """Run each repetition of every contender, rotating who goes first."""
    for rep in range(reps):
        shift = rep % len(runs)
        for run in (*runs[shift:], *runs[:shift]):
            run(rep)


def fleet_worker(
    env: BenchEnv, cfg: Config, pool: str, sim: Server, wait: bool = True, **options: Any
) -> WorkerProcess:
    """A fleet worker on ``sim``; ``options`` go to ``BenchEnv.start_worker``."""
    return env.start_worker(pool, cfg.concurrency, sim.url, wait, **options)


def noop_worker(env: BenchEnv, cfg: Config, pool: str, wait: bool = True) -> WorkerProcess:
    """A bare Celery worker on its own quorum queue."""
    queue = noop_queue(env.settings).name
    return env.start_worker(pool, cfg.concurrency, wait=wait, app="bench.noop_app", queues=queue)


def with_bare(env: BenchEnv, cfg: Config, pool: str) -> tuple[Server, Any, Any, Submit]:
    """An instant simulator, fleet and bare Celery workers, warm, and a bare task publisher."""
    sim, noop = env.start_sim(), bare(env)
    workers = fleet_worker(env, cfg, pool, sim, False), noop_worker(env, cfg, pool, False)
    env.wait_ready(*workers)
    warm(fleet(env.producer), cfg.concurrency)
    burst(noop, cfg.concurrency * 3)
    return sim, *workers, noop


def _throughput(
    cfg: Config, pool: str, made: Outcome, runs: _Runs, target: float | None, digits: int = 2
) -> Outcome:
    """``made`` with jobs/s of baseline and fleet (``runs``), their ratio against ``target``."""
    (base_name, base_run), (mine_name, mine_run) = runs.items()
    base, mine = list[float](), list[float]()
    alternate(cfg.reps, lambda _: mine.append(mine_run()), lambda _: base.append(base_run()))
    ratio = median(mine) / median(base)
    row = Row("throughput (jobs/s)", span(base, digits), span(mine, digits), f"x{fmt(ratio, 3)}")
    if target is not None:
        row.target, row.met = f"ratio >= {target:g}", ratio >= target
    pairs, made.rows = enumerate(zip(base, mine, strict=True), 1), [row]
    names = ("rep", f"{base_name} jobs/s", f"{mine_name} jobs/s")
    made.reps = [dict(zip(names, (i, a, b), strict=True)) for i, (a, b) in pairs]
    made.extra = {"pool": pool, "base": median(base), "fleet": median(mine), "ratio": ratio}
    return made


def overhead(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Sequential jobs on an instant simulator: the fleet's latency on top of a direct call."""
    sim, _, _, noop = with_bare(env, cfg, pool)
    client = env.closing(OllamaClient(sim.url))
    calls = {
        "fleet": done(fleet(env.producer)),
        "direct": lambda _: client.generate(MODEL, "bench direct"),
        "bare Celery": done(noop),
    }
    timed_ms(calls["direct"], 20)
    runs: dict[str, list[list[float]]] = {name: [] for name in calls}
    timed = (lambda _, n=n: runs[n].append(timed_ms(calls[n], cfg.overhead_jobs)) for n in calls)
    alternate(cfg.reps, *timed)
    names, reps = ("direct", "fleet", "bare Celery"), list[dict[str, float]]()
    for rep in range(cfg.reps):
        figures = {f"{n} p{q} ms": percentile(runs[n][rep], q) for q in (50, 99) for n in names}
        reps.append({"rep": rep + 1} | figures)
    med = {k: median([r[k] for r in reps]) for k in reps[0] if k != "rep"}

    def added(metric: str, base: float, mine: float, limit: float = 0.0) -> Row:
        row = Row(metric, fmt(base), fmt(mine), f"+{fmt(mine - base)} ms")
        if limit:
            row.target, row.met = f"difference <= {limit:g} ms", mine - base <= limit
        return row

    rows = [
        added(f"p{q} latency (ms)", med[f"direct p{q} ms"], med[f"fleet p{q} ms"], limit)
        for q, limit in ((50, 3.0), (99, 10.0))
    ]
    pooled = {n: percentile([x for rep in runs[n] for x in rep], 99) for n in names}
    rows.append(added("p99 over all repetitions pooled (ms)", pooled["direct"], pooled["fleet"]))
    floor = f"{fmt(med['bare Celery p50 ms'])} / {fmt(med['bare Celery p99 ms'])}"
    what = "floor: a bare Celery no-op round trip, p50 / p99 (ms), no Ollama call"
    rows.append(Row(what, "-", floor, "the least any Celery job adds here"))
    extra = {"pool": pool, **{k.replace(" ms", ""): v for k, v in med.items()}}
    title = f"1. Overhead ({pool}, concurrency {cfg.concurrency})"
    return Outcome("1", title, "direct httpx", f"fleet ({pool})", rows, reps, extra=extra)


def saturation(env: BenchEnv, cfg: Config, pool: str, jitter_ms: float = 0.0) -> Outcome:
    """A simulator with 4 slots and 200 ms per generation: can the fleet keep it busy?"""
    sim = env.start_sim(latency_ms=200, latency_jitter_ms=jitter_ms)
    fleet_worker(env, cfg, pool, sim)
    clients = [env.closing(OllamaClient(sim.url)) for _ in range(4)]
    direct = [lambda _, c=c: c.generate(MODEL, "bench direct") for c in clients]
    submit, jobs = fleet(env.producer), cfg.saturation_jobs
    burst(submit, cfg.concurrency * 2)
    parallel(direct, 8)
    spread = f", generations of {200 - jitter_ms:g}-{200 + jitter_ms:g} ms" if jitter_ms else ""
    title = f"2. Saturation{spread} ({pool}, concurrency {cfg.concurrency})"
    made = Outcome("2j" if jitter_ms else "2", title, "direct httpx, 4 clients", f"fleet ({pool})")
    runs = {"direct": lambda: jobs / parallel(direct, jobs)[0]}
    runs["fleet"] = lambda: jobs / burst(submit, jobs)
    # The jittered run explains scenario 2's figures; it has no target of its own (issue 28's
    # is 0.98).
    return _throughput(cfg, pool, made, runs, target=None if jitter_ms else 0.98)


def dispatch(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """An instant simulator: fleet jobs/s against bare Celery no-op tasks, same broker setup."""
    base = with_bare(env, cfg, pool)[3]
    mine, jobs = fleet(env.producer), cfg.dispatch_jobs
    title = f"3. Dispatch ({pool}, concurrency {cfg.concurrency})"
    made = Outcome("3", title, "bare Celery no-op", f"fleet ({pool})")
    runs = {"bare no-op": lambda: jobs / burst(base, jobs)}
    runs["fleet"] = lambda: jobs / burst(mine, jobs)
    return _throughput(cfg, pool, made, runs, target=0.7, digits=1)


# The most a worker of each pool may hold with 10,000 jobs queued (issue 28: threads).
_MEMORY_MB = {"threads": 100, "prefork": 250}


def _memory_mb(worker: WorkerProcess) -> list[tuple[float, ...]]:
    """RSS, PSS and USS of each process of the worker (main first), in MB."""
    found = []
    for proc in process_tree(worker):
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            found.append(tuple(getattr(info, k, 0) / 2**20 for k in ("rss", "pss", "uss")))
    return found


def _drain(
    env: BenchEnv, sends: list[Submit], queue: str, backlog: int, start: Callable[[], WorkerProcess]
) -> dict[str, Any]:
    """Fill ``queue``, then start the worker and sample its memory every 0.5 s until it drained."""
    began = time.perf_counter()
    handles = parallel(sends, backlog)[1]
    wait_for(lambda: env.queue_depth(queue) >= backlog, 120, f"{backlog} messages in {queue}")
    filled, worker, began = time.perf_counter() - began, start(), time.perf_counter()
    samples: list[tuple[float, ...]] = []
    while True:
        depth = env.queue_depth(queue)
        for handle in handles[-8:] if depth == 0 else ():  # the last jobs' results are in
            handle.get(timeout=_GET_TIMEOUT_S)
        if mem := _memory_mb(worker):
            at = time.perf_counter() - began
            samples.append((at, backlog - depth, *map(sum, zip(*mem, strict=True))))
        if depth == 0:
            break
        worker.check_running("the worker")
        time.sleep(0.5)
    env.stop(worker)
    (seconds, _, rss, pss, uss), peak = samples[-1], max(s[2] for s in samples)
    warm_at = next((s for s in samples if s[1] >= max(1, backlog // 20)), samples[-1])
    growth = 100.0 * (max(s[2] for s in samples if s[0] >= warm_at[0]) - warm_at[2]) / warm_at[2]
    found = {"end_rss": rss, "peak_rss": peak, "growth_pct": growth, "end_pss": pss, "end_uss": uss}
    found |= {"rate": backlog / seconds, "filled_s": filled, "seconds": seconds}
    return {**found, "samples": samples, "processes": mem}


def memory(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """One node at concurrency 4 drains a backlog; its memory must stay small and flat."""
    sim = env.start_sim()
    env.purge_results()

    def unconfirmed() -> Submit:  # a backlog fills fast; its depth is checked before the drain
        made = env.closing(Producer(env.make_settings()))
        made.app.conf.broker_transport_options = {}
        return fleet(made)

    cfg.log(f"  {cfg.backlog} jobs to queue, then the {pool} worker")
    start = lambda: fleet_worker(env, cfg, pool, sim, False)  # noqa: E731
    mine = _drain(env, [unconfirmed(), unconfirmed()], JOB_QUEUE, cfg.backlog, start)
    base: dict[str, Any] = {}
    if cfg.memory_baseline:
        submits = [bare(env, confirms=False), bare(env, confirms=False)]
        queue, start = noop_queue(env.settings).name, lambda: noop_worker(env, cfg, pool, False)
        base = _drain(env, submits, queue, cfg.backlog, start)
    env.purge_results()
    rows, most = [], _MEMORY_MB[pool]
    for metric, key, target, checked, limit in (
        ("RSS, main + pool children, at the end (MB)", "end_rss", " MB", "peak_rss", most),
        ("RSS at its highest (MB)", "peak_rss", " MB", "peak_rss", most),
        ("RSS growth, warm (5% drained) to highest (%)", "growth_pct", "%", "growth_pct", 10),
        ("PSS at the end (MB; shared pages split between processes)", "end_pss", "", "", 0),
        ("USS at the end (MB; pages only that process has)", "end_uss", "", "", 0),
        ("drain rate (jobs/s, incl. worker start)", "rate", "", "", 0),
    ):
        row = Row(metric, fmt(base[key], 1) if base else "not run", fmt(mine[key], 1))
        if target:
            row.met, row.target = mine[checked] <= limit, f"fleet <= {limit}{target}"
        rows.append(row)
    if base:
        rows[0].compared = f"x{fmt(mine['end_rss'] / base['end_rss'])}"
    samples = mine["samples"]
    keep = [samples[round(i * (len(samples) - 1) / 11)] for i in range(12)]
    keep = samples if len(samples) <= 12 else keep
    each = [
        f"{'main' if i == 0 else f'child {i}'} {' / '.join(f'{mb:.0f}' for mb in p)}"
        for i, p in enumerate(mine["processes"])
    ]
    note = (
        f"Backlog queued in {mine['filled_s']:.1f} s; {len(mine['samples'])} samples over "
        f"{mine['seconds']:.0f} s. At the end, RSS / PSS / USS per process (MB): {'; '.join(each)}."
    )
    title, columns = f"4. Memory ({pool}, concurrency {cfg.concurrency})", ("t s", "done")
    reps = [dict(zip((*columns, "rss MB", "pss MB", "uss MB"), s, strict=True)) for s in keep]
    extra = {f"fleet_{k}": v for k, v in mine.items()} | {f"base_{k}": v for k, v in base.items()}
    sides = ("bare Celery no-op worker", f"fleet ({pool})")
    return Outcome("4", title, *sides, rows, reps, [note], extra | {"pool": pool})


def scale_out(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Two nodes, each a worker with its own simulator, against one node of scenario 2."""
    sims = [env.start_sim(latency_ms=200) for _ in range(2)]
    first, second = (fleet_worker(env, cfg, pool, sim, False) for sim in sims)
    env.wait_ready(first, second)
    submit, jobs = fleet(env.producer), cfg.scale_jobs
    burst(submit, cfg.concurrency * 4)
    env.control(second, "cancel_consumer", queue=JOB_QUEUE)

    def two_nodes() -> float:
        with env.consuming(second):
            return 2 * jobs / burst(submit, 2 * jobs)

    title = f"5. Scale-out ({pool}, concurrency {cfg.concurrency} per node)"
    runs = {"one node": lambda: jobs / burst(submit, jobs), "two nodes": two_nodes}
    return _throughput(cfg, pool, Outcome("5", title, "one node", "two nodes"), runs, target=1.8)
