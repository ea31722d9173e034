"""Scenarios of unlike nodes (issue 24): a mix of models on nodes that hold one model at a
time, and interactive jobs behind a batch backlog."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from avocado_shared import Producer
from avocado_shared.routing import Lane, canonical_model, lane_queue_name
from avocado_shared.topology import GENERATE_TASK
from bench.report import Outcome, Row, fmt, median, percentile
from bench.scenarios import Config, burst, fleet, fleet_worker
from bench.services import MODEL, BenchEnv
from tests.processes import Server, WorkerProcess, wait_for

__all__ = ["drain", "lanes", "model_mix"]

OTHER = "qwen2.5:0.5b"
LOAD_MS = 3000.0
JOB_MS = 100.0
_MIX_TARGET = 0.95
_GET_TIMEOUT_S = 600.0


def _mixed(producer: Producer, jobs: int, *, one_queue: bool = False) -> float:
    """Seconds from the first publish to the last result of ``jobs`` jobs of each model,
    published in turn; ``one_queue``: all into the first model's queue, as every job shared
    one FIFO queue before jobs were routed by model (a node runs what it is given)."""
    began = time.perf_counter()
    queue = lane_queue_name(canonical_model(MODEL), Lane.BATCH) if one_queue else None
    handles = [
        _publish(producer, f"mix {i}", model, queue)
        for i in range(jobs)
        for model in (MODEL, OTHER)
    ]
    for handle in handles:
        handle.get(timeout=_GET_TIMEOUT_S)
    return time.perf_counter() - began


def _publish(producer: Producer, prompt: str, model: str, queue: str | None) -> Any:
    """A generation of ``model``: routed by the producer, or straight into ``queue``."""
    if queue is None:
        return producer.generate(prompt, model=model)
    task = producer.app.tasks[GENERATE_TASK]
    request = {"prompt": prompt, "model": model}
    return task.apply_async(kwargs={"request": request}, exchange="ml", routing_key=queue)


def _nodes(
    env: BenchEnv, cfg: Config, pool: str, models: list[tuple[str, ...]], **variables: str
) -> list[tuple[Server, WorkerProcess]]:
    """One node per entry: a simulator holding those models on disk, one in memory at a
    time (a load costs ``LOAD_MS``), one slot, and a worker of one slot on it."""
    made = []
    for held in models:
        sim = env.start_sim(1, models=held, latency_ms=JOB_MS, load_ms=LOAD_MS, max_loaded=1)
        variables = {"AVOCADO_DEFAULT_MODEL": held[0], **variables}
        worker = env.start_worker(pool, 1, sim.url, variables=variables)
        made.append((sim, worker))
    return made


def model_mix(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Two models, two nodes of one slot that hold one model in memory at a time: jobs of
    both models in turn, against the no-swap ideal (each node has one model only) and
    against one queue for all (each node takes any job, as before routing: a swap nearly
    per job, so that run is shorter: at most 10 jobs of each model)."""
    runs: dict[str, list[float]] = {"ideal": [], "single": [], "routed": []}
    loads: dict[str, list[int]] = {key: [] for key in runs}
    setups = {
        "ideal": ([(MODEL,), (OTHER,)], {}),
        # Room for both: a node keeps consuming the one queue whichever model is in memory.
        "single": ([(MODEL, OTHER), (MODEL, OTHER)], {"AVOCADO_MAX_MODELS": "2"}),
        "routed": ([(MODEL, OTHER), (MODEL, OTHER)], {}),
    }
    for rep in range(cfg.reps):
        for name in list(runs)[rep % 3 :] + list(runs)[: rep % 3]:
            models, variables = setups[name]
            nodes = _nodes(env, cfg, pool, models, **variables)
            single = name == "single"
            jobs = min(cfg.mix_jobs, 10) if single else cfg.mix_jobs
            runs[name].append(2 * jobs / _mixed(env.producer, jobs, one_queue=single))
            loads[name].append(sum(_loads(sim) for sim, _ in nodes))
            env.stop(*(child for node in nodes for child in reversed(node)))
            env.purge_results()
            cfg.log(f"  {name}: {runs[name][-1]:.2f} jobs/s, {loads[name][-1]} loads")
    ideal, single, routed = (median(runs[k]) for k in runs)
    rows = [
        Row("jobs/s, no-swap ideal", "", fmt(ideal)),
        Row(
            "jobs/s, one queue for every model (as before routing)",
            fmt(ideal),
            fmt(single),
            f"x{fmt(single / ideal)}",
        ),
        Row(
            "jobs/s, routed (this fleet's defaults)",
            fmt(ideal),
            fmt(routed),
            f"x{fmt(routed / ideal)}",
            f">= {_MIX_TARGET} of the ideal",
            routed / ideal >= _MIX_TARGET,
        ),
        Row(
            "model loads per run (ideal / single / routed)",
            "",
            " / ".join(str(round(median(loads[k]))) for k in loads),
        ),
    ]
    note = (
        f"{cfg.mix_jobs} jobs of each model ({MODEL}, {OTHER}; {min(cfg.mix_jobs, 10)} in the "
        "one-queue run, whose every job may swap) published in turn, all at once; each "
        f"node: a simulator with one slot, {JOB_MS:.0f} ms per answer, {LOAD_MS / 1000:.0f} s to "
        "load a model not in memory, room for one model; a worker of one slot. Medians of "
        f"{cfg.reps} repetitions."
    )
    reps = [{"run": i + 1, **{k: round(v[i], 2) for k, v in runs.items()}} for i in range(cfg.reps)]
    title = f"6. Model mix ({pool}, 2 nodes x 1 slot, {LOAD_MS / 1000:.0f} s loads)"
    return Outcome("6", title, "no-swap ideal", "fleet", rows, reps, [note], {"runs": runs})


def _loads(sim: Server) -> int:
    """Models the simulator subprocess loaded into memory (each swap is one)."""
    return int(httpx.get(f"{sim.url}/_sim/stats", timeout=5).json()["loads"])


def _waits(producer: Producer, count: int, lane: Lane) -> list[float]:
    """Queue waits (ms) of ``count`` jobs sent one after another in ``lane``, each after the
    last one's answer: from the publish to the job's start (its STARTED row)."""
    waits = []
    for i in range(count):
        sent = time.time()
        handle = producer.generate(f"interactive {i}", lane=lane)
        handle.get(timeout=_GET_TIMEOUT_S)
        row = producer.results.get(handle.id)
        assert row is not None
        waits.append(1000.0 * (row.created_at.timestamp() - sent))
    return waits


def lanes(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """A batch backlog queued, then interactive jobs one at a time: their queue wait in the
    interactive lane against the same jobs queued behind the backlog (a single FIFO)."""
    sim = env.start_sim(cfg.concurrency, latency_ms=JOB_MS)
    fleet_worker(env, cfg, pool, sim, True)
    burst(fleet(env.producer), cfg.concurrency * 2)
    found: dict[str, list[float]] = {"fifo": [], "lane": []}
    for rep in range(cfg.reps):
        for name in ("fifo", "lane") if rep % 2 == 0 else ("lane", "fifo"):
            backlog = [env.producer.generate(f"batch {i}") for i in range(cfg.lane_backlog)]
            lane = Lane.BATCH if name == "fifo" else Lane.INTERACTIVE
            found[name] += _waits(env.producer, cfg.lane_jobs, lane)
            for handle in backlog:
                handle.get(timeout=_GET_TIMEOUT_S)
            cfg.log(f"  {name}: p50 {median(found[name][-cfg.lane_jobs :]):.0f} ms")
    env.purge_results()
    fifo, lane = found["fifo"], found["lane"]
    rows = [
        Row("queue wait p50 (ms)", fmt(median(fifo), 0), fmt(median(lane), 0)),
        Row(
            "queue wait p95 (ms)",
            fmt(percentile(fifo, 95), 0),
            fmt(percentile(lane, 95), 0),
            f"x{fmt(percentile(lane, 95) / percentile(fifo, 95), 3)}",
            f"<= one job's service time ({JOB_MS:.0f} ms)",
            percentile(lane, 95) <= JOB_MS,
        ),
    ]
    note = (
        f"One worker of {cfg.concurrency} slots on a simulator of {cfg.concurrency} slots, "
        f"{JOB_MS:.0f} ms per answer. Each repetition queues {cfg.lane_backlog} batch jobs, then "
        f"sends {cfg.lane_jobs} jobs one after another (each once the last one answered): in "
        "the batch lane behind the backlog (the single FIFO queue of before), or in the "
        "interactive lane. Queue wait: from the publish to the job's start (its STARTED row "
        f"in ml_results). {cfg.reps} repetitions, alternating; percentiles over all jobs."
    )
    extra: dict[str, Any] = {"waits": found}
    title = f"7. Lanes ({pool}, {cfg.lane_backlog} batch jobs queued)"
    return Outcome("7", title, "single FIFO", "interactive lane", rows, [], [note], extra)


def _stats(sim: Server) -> dict[str, int]:
    """The simulator subprocess's counters (``/_sim/stats``)."""
    found: dict[str, int] = httpx.get(f"{sim.url}/_sim/stats", timeout=5).json()
    return found


def _drain_run(env: BenchEnv, cfg: Config, pool: str, cutoff: bool) -> dict[str, float]:
    """One node of one slot on jobs of ``cfg.drain_job_s``, stopped ``cfg.cutoff_s`` after it
    starts: told so (it drains), or not (SIGKILLed then, as a notebook's session ends); a
    second node then runs what is left. Jobs cut, when the first node was gone, jobs it ran."""
    sim = env.start_sim(1, latency_ms=cfg.drain_job_s * 1000)
    at = datetime.now(timezone.utc) + timedelta(seconds=cfg.cutoff_s)
    told = {"AVOCADO_CUTOFF": at.isoformat(), "AVOCADO_DRAIN_MARGIN_S": "2"} if cutoff else {}
    node = env.start_worker(pool, 1, sim.url, variables=told)
    jobs = [env.producer.generate(f"drain {i}") for i in range(cfg.drain_jobs)]
    if cutoff:
        wait_for(lambda: not node.alive(), cfg.cutoff_s + 30, "the node to leave")
    else:
        wait_for(lambda: datetime.now(timezone.utc) >= at, cfg.cutoff_s + 30, "the cutoff")
        node.kill()
    gone = (datetime.now(timezone.utc) - at).total_seconds() + cfg.cutoff_s
    ran = sum(job.ready() for job in jobs)
    env.start_worker(pool, 1, sim.url)
    for job in jobs:
        job.get(timeout=_GET_TIMEOUT_S)
    rows = [env.producer.results.get(job.id) for job in jobs]
    cut = sum(1 for row in rows if row is not None and row.attempts > 1)
    abandoned = _stats(sim)["abandoned"]
    env.tidy()  # stops the simulator: read first
    return {"cut": cut, "gone_s": gone, "ran": ran, "abandoned": abandoned}


def drain(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """A node with a known cutoff, against the same node stopped at that time unwarned."""
    told = _drain_run(env, cfg, pool, cutoff=True)
    unwarned = _drain_run(env, cfg, pool, cutoff=False)
    rows = [
        Row(
            "jobs cut by the stop (run again elsewhere: attempts > 1)",
            f"{unwarned['cut']:.0f}",
            f"{told['cut']:.0f}",
            target="0 with a cutoff",
            met=told["cut"] == 0,
        ),
        Row(
            "node gone, seconds after it started",
            f"{unwarned['gone_s']:.1f}",
            f"{told['gone_s']:.1f}",
            target=f"before the cutoff ({cfg.cutoff_s:.0f} s)",
            met=told["gone_s"] < cfg.cutoff_s,
        ),
        Row("jobs it finished before it was gone", f"{unwarned['ran']:.0f}", f"{told['ran']:.0f}"),
        Row(
            "answers the server was cut off in",
            f"{unwarned['abandoned']:.0f}",
            f"{told['abandoned']:.0f}",
        ),
    ]
    note = (
        f"One worker of one slot on a simulator of one slot, {cfg.drain_job_s:.0f} s per "
        f"answer, {cfg.drain_jobs} jobs queued once it is ready; it is stopped "
        f"{cfg.cutoff_s:.0f} s after it was started: told so (AVOCADO_CUTOFF, a margin of 2 "
        "s), or SIGKILLed then unwarned. A second node then runs what is left; attempts from "
        "ml_results."
    )
    title = f"8. Drain ({pool}, cutoff {cfg.cutoff_s:.0f} s, {cfg.drain_job_s:.0f} s jobs)"
    return Outcome("8", title, "no cutoff (killed)", "cutoff", rows, [], [note], {})
