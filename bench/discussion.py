"""The prose of BENCHMARKS.md: pool choice, profiles, fixes and targets, from the measured figures.

Every number in the text comes from this run; the reasoning around them is fixed text that the
figures either bear out or visibly contradict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.outcome import Outcome
from bench.stats import fmt

if TYPE_CHECKING:
    from bench.scenarios import Config

__all__ = ["discussion"]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from bench.report import table

    return table(header, rows)


def _find(outcomes: Sequence[Outcome], key: str, pool: str | None = None) -> Outcome | None:
    for outcome in outcomes:
        if outcome.key == key and (pool is None or outcome.extra.get("pool") == pool):
            return outcome
    return None


def _x(outcome: Outcome | None, name: str) -> float:
    if outcome is None:
        return math.nan
    value = outcome.extra.get(name, math.nan)
    return float(value)


# --- pool ------------------------------------------------------------------------------------

_MEMORY_TARGET_MB = 250.0


def _ran(outcomes: Sequence[Outcome], cfg: Config) -> list[str]:
    """The pools scenarios 1-4 ran in, in ``cfg.pools`` order."""
    return [
        p
        for p in cfg.pools
        if any(o.key in ("1", "2", "3", "4") and o.extra.get("pool") == p for o in outcomes)
    ]


def _pool_row(outcomes: Sequence[Outcome], pool: str, default: str) -> list[str]:
    s1, s2, s3, s4 = (_find(outcomes, k, pool) for k in ("1", "2", "3", "4"))
    return [
        f"{pool} (default)" if pool == default else pool,
        f"{fmt(_x(s1, 'fleet50'))} / {fmt(_x(s1, 'fleet99'))} "
        f"(+{fmt(_x(s1, 'fleet50') - _x(s1, 'direct50'))} / "
        f"+{fmt(_x(s1, 'fleet99') - _x(s1, 'direct99'))})",
        f"{fmt(_x(s2, 'fleet'))} (x{fmt(_x(s2, 'ratio'), 3)})",
        f"{fmt(_x(s3, 'fleet'), 1)} (x{fmt(_x(s3, 'ratio'), 3)})",
        f"{fmt(_x(s4, 'fleet_end_rss'), 0)} / {fmt(_x(s4, 'fleet_end_pss'), 0)}",
        fmt(_x(s4, "base_end_rss"), 0),
        fmt(_x(s4, "fleet_growth_pct"), 1),
        fmt(_x(s4, "fleet_rate"), 0),
    ]


def _which_meet(outcomes: Sequence[Outcome], pools: Sequence[str]) -> str:
    meet = [p for p in pools if _x(_find(outcomes, "4", p), "fleet_peak_rss") <= _MEMORY_TARGET_MB]
    if not meet:
        return "Neither pool meets"
    if len(meet) == len(pools):
        return "Both pools meet"
    return f"Only {' and '.join(f'`{p}`' for p in meet)} meets"


def _turnaround(saturation: Outcome | None, concurrency: int) -> float:
    """Milliseconds a slot idles per job in scenario 2, beyond what direct calls take."""
    fleet, direct = _x(saturation, "fleet"), _x(saturation, "direct")
    return 1000.0 * concurrency * (1.0 / fleet - 1.0 / direct)


def _spread(outcomes: Sequence[Outcome]) -> str:
    """Scenario 2 with generation times spread out, per pool, when it ran."""
    runs = [o for o in outcomes if o.key == "2j"]
    if not runs:
        return ""
    figures = " and ".join(f"{o.extra['pool']} x{fmt(_x(o, 'ratio'), 3)}" for o in runs)
    ratios = {str(o.extra["pool"]): _x(o, "ratio") for o in runs}
    closes = ratios.get("threads", 0.0) >= ratios.get("prefork", 1.0) - 0.005
    return (
        "; the gap between the pools comes from 4 jobs ending at once in this scenario: "
        f"with generation times spread over 100-300 ms, {figures}"
        if closes
        else f"; with generation times spread over 100-300 ms, {figures}"
    )


def _pools(outcomes: Sequence[Outcome], cfg: Config) -> list[str]:
    pools = _ran(outcomes, cfg)
    if not pools:
        return []
    default = cfg.default_pool
    text = [
        "## Worker pool and concurrency",
        "",
        f"Scenarios 1-4 per pool, all at concurrency {cfg.concurrency} (bare Celery in the same "
        "pool as the fleet each time):",
        "",
        _table(
            [
                "pool",
                "1: p50 / p99 ms (over direct)",
                "2: jobs/s (ratio to direct)",
                "3: jobs/s (ratio to bare Celery)",
                "4: RSS / PSS MB at the end",
                "4: bare Celery RSS MB",
                "4: growth %",
                "4: drain jobs/s",
            ],
            [_pool_row(outcomes, p, default) for p in pools],
        ),
        "",
        f"**The default pool is `{default}` (`AVOCADO_WORKER_POOL`, which "
        "`ollama_worker.celery_app` copies to Celery's `worker_pool`), with `--concurrency` "
        "equal to the number of requests the node's Ollama serves at once "
        "(`OLLAMA_NUM_PARALLEL`; the scripts' default 1).**",
        "",
    ]
    if not {"threads", "prefork"} <= set(pools):
        return [
            *text,
            f"Only {', '.join(f'`{p}`' for p in pools)} ran here; `--pools threads,prefork` "
            "compares both.",
            "",
        ]
    t = {k: _find(outcomes, k, "threads") for k in ("1", "2", "3", "4")}
    p = {k: _find(outcomes, k, "prefork") for k in ("1", "2", "3", "4")}
    c = cfg.concurrency

    def over(outcome: Outcome | None, q: int) -> str:
        return f"+{fmt(_x(outcome, f'fleet{q}') - _x(outcome, f'direct{q}'))} ms"

    bare_memory = ""
    if "base_end_rss" in (p["4"].extra if p["4"] else {}):
        bare_memory = (
            f"; bare Celery's prefork worker alone holds {fmt(_x(p['4'], 'base_end_rss'), 0)} "
            f"MB, under threads {fmt(_x(t['4'], 'base_end_rss'), 0)} MB"
        )
    cpu_shows = _x(p["3"], "ratio") > _x(t["3"], "ratio")
    scenario3 = (
        f"prefork x{fmt(_x(p['3'], 'ratio'), 3)} of bare Celery against threads "
        f"x{fmt(_x(t['3'], 'ratio'), 3)}"
    )
    text += [
        "The reasons, from this run:",
        "",
        f"1. Memory. At concurrency {c} the threads worker holds "
        f"{fmt(_x(t['4'], 'fleet_end_rss'), 0)} MB RSS in one process (PSS "
        f"{fmt(_x(t['4'], 'fleet_end_pss'), 0)} MB); prefork holds "
        f"{fmt(_x(p['4'], 'fleet_end_rss'), 0)} MB summed over its main process and {c} "
        f"children (PSS {fmt(_x(p['4'], 'fleet_end_pss'), 0)} MB: most of it pages the forked "
        f"children share){bare_memory}. {_which_meet(outcomes, ['threads', 'prefork'])} the "
        f"{_MEMORY_TARGET_MB:.0f} MB target.",
        "2. Throughput. With a 200 ms model (scenario 2) threads reach "
        f"x{fmt(_x(t['2'], 'ratio'), 3)} of direct calls and prefork "
        f"x{fmt(_x(p['2'], 'ratio'), 3)}: between two generations a slot idles "
        f"{fmt(_turnaround(t['2'], c), 1)} ms under threads and "
        f"{fmt(_turnaround(p['2'], c), 1)} ms under prefork{_spread(outcomes)}. An LLM job "
        "waits on Ollama "
        "almost all its time: with a 2 s generation, a small model on a notebook GPU, the "
        f"same turnaround gives x{fmt(2000 / (2000 + _turnaround(t['2'], c)), 3)} and "
        f"x{fmt(2000 / (2000 + _turnaround(p['2'], c)), 3)}, so the pool hardly sets "
        f"throughput. Per job (scenario 1) threads add {over(t['1'], 50)} "
        f"at p50 and {over(t['1'], 99)} at p99, prefork {over(p['1'], 50)} and "
        f"{over(p['1'], 99)}. With a model that answers at once (scenario 3) threads dispatch "
        f"{fmt(_x(t['3'], 'fleet'), 1)} jobs/s and prefork {fmt(_x(p['3'], 'fleet'), 1)} "
        f"({scenario3}).",
        "3. Time limits hold in both pools. Celery's threads pool enforces no time limit, so "
        "the Ollama client enforces the job's soft limit itself: `JobTask.attempt` runs each "
        "attempt inside `OllamaClient.deadline(soft_time_limit)`, which cuts every request's "
        "timeouts to the time left and raises `DeadlinePassed` (a `JobTimedOut`) once it has "
        "passed, mid-stream included. A stalled Ollama stream no longer holds a slot in either "
        "pool.",
        "",
        "What prefork still adds:",
        "",
        "- The hard time limit: a job that ignores its soft limit outside the Ollama calls "
        "(stuck in its own Python code) is killed with its child, which billiard replaces. "
        "Under threads it runs on, holding its slot.",
        "- Isolation: a job that leaks or crashes takes down one child, which billiard "
        "replaces and whose message RabbitMQ redelivers (`reject_on_worker_lost`); under "
        "threads it takes down the whole node.",
        "- Cancelling running jobs when the broker connection is lost "
        "(`worker_cancel_long_running_tasks_on_connection_loss`). A thread cannot be "
        "cancelled: the job finishes, its ack fails on the dead channel and RabbitMQ "
        "redelivers the message, so the job runs again. Delivery is at-least-once either way.",
        "- CPU parallelism for a job's own Python work (the result row, the result backend): "
        "under threads it shares one GIL with the consumer loop. It matters only with a model "
        "that answers at once, as in scenario 3 "
        + (f"({scenario3})." if cpu_shows else f"(and does not show in this run: {scenario3})."),
        "",
        "Choose prefork (`AVOCADO_WORKER_POOL=prefork`) when these matter more than memory: a "
        "host with memory to spare, jobs with heavy Python work around the Ollama call, or "
        "code that may not honour its time limit. Either way, concurrency above Ollama's "
        "parallel slots buys nothing: the extra jobs only wait in Ollama's queue while holding "
        "a prefetched message. The way to more throughput is more nodes (scenario 5).",
        "",
    ]
    return text


# --- profiles --------------------------------------------------------------------------------


def _cpu(profile: dict[str, Any]) -> list[str]:
    columns: dict[str, dict[str, float]] = profile.get("cpu") or {}
    if not columns:
        return []
    names = list(next(iter(columns.values())))
    extra = [n for c in columns.values() for n in c if n not in names]
    names += list(dict.fromkeys(extra))
    rows = [[n, *(fmt(c.get(n, math.nan)) for c in columns.values())] for n in names]
    rows.append(
        [
            "**all of these**",
            *(f"**{fmt(sum(v for v in c.values()))}**" for c in columns.values()),
        ]
    )
    return [
        "### CPU per job, fleet against bare Celery",
        "",
        f"CPU time (user + system, psutil) of each process group divided by the jobs done: "
        f"{profile.get('cpu_seq')} sequential jobs, then bursts of {profile.get('cpu_burst')}. "
        "RabbitMQ and Redis are whole servers shared with anything else running here. On this "
        "2-core machine, CPU per job is what caps scenario 3's throughput.",
        "",
        _table(["process", *columns], rows),
        "",
    ]


def _spy(profile: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for key, title, cpu_key in (
        ("spy_sequential", "sequential jobs (scenario 1)", "fleet, sequential"),
        ("spy_burst", "bursts (scenario 3)", "fleet, bursts"),
    ):
        spy = profile.get(key)
        if not spy:
            continue
        if "error" in spy:
            parts += [f"py-spy, {title}: {spy['error']}", ""]
            continue
        measured = (profile.get("cpu") or {}).get(cpu_key, {}).get("worker (main + pool)")
        scale = f"{fmt(measured)} ms" if measured is not None else "n/a"
        rows = [
            [
                name,
                f"{fmt(pct, 1)}%",
                fmt(pct / 100.0 * measured) if measured is not None else "n/a",
            ]
            for name, _, pct in spy["categories"]
        ]
        where = ", ".join(
            f"{k} {fmt(100.0 * v / spy['cpu_ms_per_job'], 0)}%" for k, v in spy["processes"].items()
        )
        parts += [
            f"#### Worker, {title}",
            "",
            f"py-spy (`record --subprocesses --nonblocking`, {spy['rate']} Hz) over every "
            f"process of the worker while {spy['jobs']} jobs ran; {spy['samples']} "
            f"samples ({where})"
            + (
                f", not counting {spy['idle']} of threads-pool threads waiting for their next job"
                if spy.get("idle")
                else ""
            )
            + ". A sample goes to the first activity its stack contains, "
            "in the order below; the ms column spreads the worker CPU per job measured above "
            f"({scale}) by these shares.",
            "",
            _table(["activity", "share of samples", "~CPU ms per job"], rows),
            "",
        ]
    return parts


def _producer(profile: dict[str, Any]) -> list[str]:
    producer = profile.get("producer")
    if not producer:
        return []
    return [
        "#### Producer (pyinstrument)",
        "",
        f"{producer['jobs']} sequential `Producer.generate(...).get()` calls in the harness, "
        f"{fmt(producer['wall_ms_per_job'])} ms each under the profiler (it slows Python "
        "code, not the waits). Wall time per job:",
        "",
        _table(["part", "ms per job"], [[n, fmt(ms)] for n, ms in producer["parts"]]),
        "",
    ]


def _wire(profile: dict[str, Any]) -> list[str]:
    wire = profile.get("wire")
    if not wire:
        return []
    rows: list[list[str]] = []
    if wire["strace"]:
        opened = sum(wire["connects"].values())
        detail = ", ".join(f"{k} {fmt(v)}" for k, v in wire["connects"].items())
        rows.append(
            ["TCP connections the worker opened", fmt(opened) + (f" ({detail})" if detail else "")]
        )
    rows.append(
        ["new AMQP connections in the vhost (producer or worker)", fmt(wire.get("new_amqp", 0.0))]
    )
    rows += [[f"worker {k}", fmt(v)] for k, v in wire["syscalls"].items()]
    rows += [[f"Redis, {k}", fmt(v)] for k, v in wire["redis"].items()]
    rows += [
        [f"Redis, keyed job, {k}", fmt(v)] for k, v in profile.get("lock_commands", {}).items()
    ]
    rows += [
        [f"AMQP socket reads / writes counted by the broker, {side}", f"{fmt(r)} / {fmt(s)}"]
        for side, (r, s) in wire["amqp"].items()
    ]
    return [
        "#### Per job on the wire",
        "",
        f"{wire['jobs']} sequential jobs: strace (`-f -e trace=connect,sendto,sendmsg,write,"
        "pwrite64,fsync,fdatasync`) on the worker's processes, Redis `MONITOR` split by client "
        "port into producer and worker, and `rabbitmqctl list_connections` counters of this "
        "run's vhost. Keyed jobs (an `idempotency_key`, so a singleton lock) counted apart.",
        "",
        _table(["what", "per job"], rows),
        "",
    ]


def _micro(profile: dict[str, Any]) -> list[str]:
    micro = profile.get("micro")
    if not micro:
        return []
    return [
        "#### Each piece alone",
        "",
        "Timed in the harness process, median of many calls, on this run's vhost, key prefix "
        "and a fresh SQLite file in the temporary directory.",
        "",
        _table(
            ["operation", "median ms", "how often per job"],
            [[n, fmt(ms, 3), how] for n, ms, how in micro],
        ),
        "",
    ]


# --- fixes -----------------------------------------------------------------------------------


def _fixes_table(profile: dict[str, Any]) -> list[str]:
    rows = profile.get("fixes")
    if not rows:
        return []
    header = [
        "variant",
        "what changed",
        "p50 ms",
        "p50 vs current (ms, + slower)",
        "jobs/s",
        "jobs/s vs current",
    ]
    body = [
        [
            r["variant"],
            r["changed"],
            fmt(r["p50 ms"]),
            "-" if r["kind"] == "current" else f"{r['p50 vs current ms']:+.2f}",
            fmt(r["jobs/s"], 1),
            "-" if r["kind"] == "current" else f"x{fmt(r['jobs/s vs current'], 2)}",
        ]
        for r in rows
    ]
    return [
        "The four fixes the previous run recommended are in the package now. To show what each "
        "saves, measured in this run, `bench/fleet_app.py` (`BENCH_VARIANT=...`) undoes one of "
        "them in the real `ollama_worker` app, or makes one candidate change that was not "
        f"applied; one worker per variant (`AVOCADO_WORKER_POOL={profile.get('fix_pool')}`), "
        "switched on in turn with `add_consumer` / `cancel_consumer`; "
        f"{profile.get('fix_seq')} sequential jobs (p50) and a burst of "
        f"{profile.get('fix_burst')} (jobs/s) per variant and repetition, alternating, "
        "medians. For `events` the variant's producer publishes `task-sent` too "
        "(`AVOCADO_TASK_EVENTS=true` on both sides). The bare Celery no-op worker ran in the "
        "same rotation. A single change moves p50 by about a millisecond or less, close to the "
        "run-to-run noise of a loaded 2-core machine; the four undone together are the figure "
        "to trust.",
        "",
        _table(header, body),
        "",
    ]


def _fix_row(profile: dict[str, Any], names: str) -> dict[str, Any] | None:
    for row in profile.get("fixes") or []:
        if row["names"] == names and row["kind"] != "bare":
            return dict(row)
    return None


def _micro_ms(profile: dict[str, Any], start: str) -> float:
    for name, ms, _ in profile.get("micro") or []:
        if name.startswith(start):
            return float(ms)
    return math.nan


def _measured(profile: dict[str, Any], names: str) -> str:
    """A variant against the current fleet, in words."""
    row = _fix_row(profile, names)
    if row is None:
        return "not measured in this run (`--scenario fixes`)"
    slower, ratio = row["p50 vs current ms"], row["jobs/s vs current"]
    text = f"p50 {slower:+.2f} ms per sequential job, burst throughput x{fmt(ratio, 2)}"
    if abs(slower) < 1.0 and abs(ratio - 1.0) < 0.05:
        text += " (within this machine's run-to-run noise)"
    return text


def _before(profile: dict[str, Any]) -> list[str]:
    from bench.fleet_app import UNDONE

    before, now = _fix_row(profile, ",".join(UNDONE)), _fix_row(profile, "")
    if before is None or now is None:
        return []
    bare = next((r for r in profile.get("fixes") or [] if r["kind"] == "bare"), None)
    text = (
        f"The fleet before the fixes (all four undone): p50 {fmt(before['p50 ms'])} ms against "
        f"{fmt(now['p50 ms'])} ms now ({before['p50 vs current ms']:+.2f} ms per job), "
        f"{fmt(before['jobs/s'], 1)} jobs/s against {fmt(now['jobs/s'], 1)} (the fixes: "
        f"x{fmt(1.0 / before['jobs/s vs current'], 2)})"
    )
    if bare is not None:
        text += (
            f". Bare Celery in the same rotation: p50 {fmt(bare['p50 ms'])} ms, "
            f"{fmt(bare['jobs/s'], 1)} jobs/s, so the dispatch ratio went from "
            f"x{fmt(before['jobs/s'] / bare['jobs/s'], 2)} to "
            f"x{fmt(now['jobs/s'] / bare['jobs/s'], 2)}"
        )
    return [text + ".", ""]


def _fixes(profile: dict[str, Any]) -> list[str]:
    """The fixes applied, each with what undoing it costs in this run; the candidates."""
    if not profile.get("fixes") and not profile.get("micro"):
        return []
    from bench.profile import JOB_PUBLISH

    confirm = _micro_ms(profile, "event-sized publish to RabbitMQ, with confirm")
    unconfirmed = _micro_ms(profile, "event-sized publish to RabbitMQ, without confirm")
    full = _micro_ms(profile, "`ml_results` upsert, SQLite WAL, synchronous=FULL")
    normal = _micro_ms(profile, "`ml_results` upsert, SQLite WAL, synchronous=NORMAL")
    store = _micro_ms(profile, "Celery Redis backend")
    lock = profile.get("lock_latency") or {}
    publish_ms = dict((profile.get("producer") or {}).get("parts", [])).get(JOB_PUBLISH, math.nan)
    evals = (profile.get("lock_commands") or {}).get("worker: EVAL lock", math.nan)
    twice = (
        f" The worker runs {fmt(evals, 0)} EVALs per keyed job: one refresh when it starts "
        "and the release twice, once in `JobTask.finish` (before the result is published, "
        "on purpose) and again in celery-singleton's `on_success`; overriding `on_success` "
        "to skip the second saves one Redis round trip per keyed job."
        if evals >= 2.5
        else f" The worker runs {fmt(evals, 0)} EVALs per keyed job: one refresh when it "
        "starts, one release in `JobTask.finish` (before the result is published, on "
        "purpose); `JobTask.on_success` skips celery-singleton's second release, one Redis "
        "round trip fewer."
        if evals >= 1.5
        else ""
    )
    return [
        "## Fixes applied, each measured undone",
        "",
        *_fixes_table(profile),
        "1. **Task events off by default** (`AVOCADO_TASK_EVENTS`, default false; "
        "`worker_send_task_events` and `task_send_sent_event` follow it). With them on, the "
        "producer publishes `task-sent` and the worker `task-received`, `task-started` and "
        "`task-succeeded` for every job, each waiting for a publisher confirm: "
        f"{fmt(confirm, 3)} ms each alone ({fmt(unconfirmed, 3)} ms unconfirmed). Undone: "
        f"{_measured(profile, 'events')}. Flower turns events on by itself in the workers it "
        "watches (its `enable_events` timer, every 5 s), so only a node Flower watches pays "
        "for them.",
        "2. **No STARTED state in Redis** (`task_track_started` off): one result-backend write "
        "fewer per job, and Celery's Redis backend reads the stored state before every write "
        f"(GET, then MULTI/SETEX/PUBLISH/EXEC): {fmt(store, 3)} ms per write alone. Undone: "
        f"{_measured(profile, 'tracking')}. `ml_results` keeps its STARTED row; "
        "`JobHandle.state` goes PENDING -> SUCCESS.",
        "3. **No extended results** (`result_extended` off): the Redis result no longer "
        "carries the job's args, kwargs, name and worker, so a summary's whole content is no "
        "longer copied into Redis beside its result. Undone: "
        f"{_measured(profile, 'extended')} (with the short prompts of this harness; the "
        "saving grows with the request).",
        "4. **SQLite `synchronous=NORMAL`** (WAL mode stays) in "
        "`ResultStore._connect_sqlite`: an upsert costs "
        f"{fmt(normal, 3)} ms alone against {fmt(full, 3)} ms with FULL, which fsyncs the WAL "
        "at each commit. A committed row survives a crashed or killed worker, not a power or "
        "kernel failure, the promise Redis's `appendfsync everysec` gives the results beside "
        f"it. Undone: {_measured(profile, 'sqlite')}. (PostgreSQL deployments are unaffected.)",
        "",
        *_before(profile),
        "Not applied, measured the same way:",
        "",
        "- **No STARTED row on a first attempt** (`startrow`: the row only on a redelivery or "
        "a retry). Not applied on purpose: the row counts attempts and records a job that is "
        f"running, and with synchronous=NORMAL it costs {fmt(normal, 3)} ms alone. "
        f"Measured: {_measured(profile, 'startrow')}.",
        f"- **No Prometheus metrics** (`AVOCADO_METRICS_PORT=0`): "
        f"{_measured(profile, 'metrics')}. Observability worth keeping.",
        "- **httpx's INFO log line off** (one `HTTP Request: POST ...` per call to Ollama, "
        f"beside Celery's own two): {_measured(profile, 'httpxlog')}.",
        "",
        "Smaller or inherent costs, measured but not changed:",
        "",
        "- Singleton lock: only keyed jobs (a summary's `share_id`, a generation's "
        "`idempotency_key`) take it: a SET NX when published, EVAL scripts when started and "
        f"done; p50 {fmt(lock.get('keyed', math.nan))} ms keyed against "
        f"{fmt(lock.get('plain', math.nan))} ms without (alternating, same run). Unkeyed "
        f"generations pay nothing.{twice}",
        f"- Publishing the job itself: {fmt(publish_ms)} ms per job waiting for RabbitMQ's "
        "confirm of a persistent message on a quorum queue (a Raft commit). This is the "
        "durability the design asks for, and bare Celery pays it too.",
        "- The producer SUBSCRIBEs to each job's result channel when it publishes "
        "(Celery's Redis backend); a producer that never waits could publish with "
        "`ignore_result`, but `Producer.generate` hands back a handle.",
        "- Connections: none is opened per job, anywhere (strace of the worker, new AMQP "
        "connections in the vhost): httpx, Redis, kombu and SQLite clients are long-lived "
        "as the style guide asks.",
        "- Serialization: pydantic validation and dumping cost hundredths of a millisecond "
        "per job; JSON encoding does not show in the profiles.",
        "",
        "A pitfall met while building the harness: kombu's connection and producer pools are "
        "process-wide, shared by every Celery app with the same broker URL and transport "
        "options. `app.pool.force_close_all()` marks that shared pool closed, after which "
        "even a new `Producer` in the same process fails with `PublishError: ... Acquire on "
        "closed pool`; `force_close_all(close_pool=False)` empties it without refilling, so "
        "the next acquire blocks forever. After a broker restart, use a connection of its "
        "own (as the tests' worker ping now does) or `kombu.pools.reset()`.",
        "",
    ]


# --- targets ---------------------------------------------------------------------------------


def _worker_top(profile: dict[str, Any], key: str, cpu_key: str, count: int = 3) -> str:
    """The worker's largest activities in a py-spy profile, with ~CPU ms per job."""
    spy = profile.get(key) or {}
    measured = (profile.get("cpu") or {}).get(cpu_key, {}).get("worker (main + pool)")
    if not spy.get("categories") or measured is None:
        return ""
    top = [
        f"{name} ~{fmt(pct / 100.0 * measured)} ms"
        for name, _, pct in spy["categories"][:count]
        if name != "other"
    ]
    return "; ".join(top)


def _cpu_total(profile: dict[str, Any], column: str, group: str | None = None) -> float:
    values = (profile.get("cpu") or {}).get(column)
    if not values:
        return math.nan
    return float(values.get(group, math.nan) if group else sum(values.values()))


def _missed(outcomes: Sequence[Outcome], key: str, pools: Sequence[str]) -> list[Outcome]:
    """The outcomes of scenario ``key`` with a target missed, in ``pools`` order."""
    found = [_find(outcomes, key, p) for p in pools]
    return [o for o in found if o is not None and any(r.met is False for r in o.rows)]


def _overhead(missed: list[Outcome], profile: dict[str, Any]) -> str:
    from bench.profile import JOB_PUBLISH, RESULT_WAIT

    s1 = missed[0]
    direct50, fleet50, bare50 = _x(s1, "direct50"), _x(s1, "fleet50"), _x(s1, "bare50")
    own = fleet50 - direct50 - bare50
    figures = "; ".join(
        f"{o.extra['pool']} +{fmt(_x(o, 'fleet50') - _x(o, 'direct50'))} ms at p50, "
        f"+{fmt(_x(o, 'fleet99') - _x(o, 'direct99'))} ms at p99"
        for o in missed
    )
    text = (
        f"- **1, overhead** ({figures}; budgets 3 ms and 10 ms). Measured: a fleet job is the "
        f"direct call plus a Celery round trip plus the fleet's own work. The round trip "
        "alone, a bare Celery no-op on the same broker, quorum queue, confirms and Redis "
        f"backend, takes {fmt(bare50)} ms at p50 here ({fmt(_x(s1, 'bare99'))} ms at p99, "
        f"{s1.extra['pool']})"
        + (": by itself above the whole 3 ms budget" if bare50 > 3.0 else "")
        + f". The fleet's own share is fleet p50 - direct p50 - bare Celery p50 = "
        f"{fmt(fleet50)} - {fmt(direct50)} - {fmt(bare50)} = {fmt(own)} ms."
    )
    parts = dict((profile.get("producer") or {}).get("parts", []))
    worker_cpu = _cpu_total(profile, "fleet, sequential", "worker (main + pool)")
    if parts or not math.isnan(worker_cpu):
        text += " Profiles:"
        if parts:
            text += (
                f" the producer waits {fmt(parts.get(JOB_PUBLISH, math.nan))} ms for the "
                "broker's confirm of each persistent job message on the quorum queue and "
                f"{fmt(parts.get(RESULT_WAIT, math.nan))} ms for the result;"
            )
        if not math.isnan(worker_cpu):
            bare_cpu = _cpu_total(profile, "bare Celery, sequential", "worker (main + pool)")
            top = _worker_top(profile, "spy_sequential", "fleet, sequential")
            text += (
                f" the worker spends {fmt(worker_cpu)} ms of CPU per sequential job against "
                f"bare Celery's {fmt(bare_cpu)}" + (f" (largest: {top})" if top else "") + "."
            )
    if bare50 > 3.0:
        text += (
            " In the way: the round trip itself, a confirmed publish to a quorum queue plus a "
            "Redis read, write and publish for the result. Trimming the fleet's own "
            f"{fmt(own)} ms cannot meet 3 ms; that takes a cheaper path (results over "
            "RabbitMQ's direct reply-to, `rpc://`, or publishing without a confirm), a design "
            "change that trades away results surviving in Redis or the publish guarantee."
        )
    else:
        text += f" In the way: the fleet's own {fmt(own)} ms (the profiles say where)."
    return text


def _saturation(missed: list[Outcome], outcomes: Sequence[Outcome]) -> str:
    figures = ", ".join(f"{o.extra['pool']} x{fmt(_x(o, 'ratio'), 3)}" for o in missed)
    s1 = _find(outcomes, "1", str(missed[0].extra["pool"]))
    text = (
        f"- **2, saturation** ({figures}; target 0.95). With prefetch 1 and late acks each "
        "slot idles from the end of one generation until its next message arrives: result "
        "row, result backend, ack, delivery, dispatch."
    )
    if s1 is not None:
        direct50, fleet50 = _x(s1, "direct50"), _x(s1, "fleet50")
        allowed = (200.0 + direct50) * (1.0 / 0.95 - 1.0)
        alone = (200.0 + direct50) / (200.0 + fleet50)
        text += (
            f" Measured: scenario 1's overhead, +{fmt(fleet50 - direct50)} ms at p50 "
            f"({s1.extra['pool']}), paid once per 200 ms generation, would alone bring the "
            f"ratio to about x{fmt(alone, 3)}"
            + (
                f"; the measured x{fmt(_x(missed[0], 'ratio'), 3)} is lower: unlike scenario "
                "1, a burst has the same 2 cores publish and collect the other jobs while each "
                "slot turns around"
                if _x(missed[0], "ratio") < alone - 0.005
                else ""
            )
            + f". In the way: the per-job turnaround, the round trip of target 1 plus the "
            f"fleet's own work; 0.95 leaves about {fmt(allowed, 1)} ms a job for all of it at "
            "200 ms per generation, proportionally more with a slower model."
        )
    met = [o for o in outcomes if o.key == "2" and o not in missed]
    if met and any(o.extra["pool"] == "threads" for o in missed):
        others = ", ".join(f"{o.extra['pool']} x{fmt(_x(o, 'ratio'), 3)}" for o in met)
        text += (
            f" The same load meets the target in the other pool ({others}). The difference "
            "between pools: the simulator's 4 slots start and end their generations "
            "together, so 4 jobs finish at once and their Python work (result row, result "
            "backend, ack) shares one GIL under threads, where prefork's children run it on "
            "both cores."
        )
    jittered = [o for o in outcomes if o.key == "2j"]
    if jittered:
        figures = ", ".join(f"{o.extra['pool']} x{fmt(_x(o, 'ratio'), 3)}" for o in jittered)
        text += (
            " Measured beside it: with generation times spread over 100-300 ms (same "
            "mean, the same times for the direct baseline), so that jobs do not end "
            f"together, as real answers of different lengths do not: {figures}."
        )
    return text


def _dispatch(missed: list[Outcome], profile: dict[str, Any]) -> str:
    figures = ", ".join(f"{o.extra['pool']} x{fmt(_x(o, 'ratio'), 3)}" for o in missed)
    text = (
        f"- **3, dispatch** ({figures}; target 0.7). With a model that answers at once, on 2 "
        "cores, the rate is set by CPU per job across producer, worker, RabbitMQ and Redis."
    )
    fleet_cpu = _cpu_total(profile, "fleet, bursts")
    bare_cpu = _cpu_total(profile, "bare Celery, bursts")
    if not math.isnan(fleet_cpu) and not math.isnan(bare_cpu):
        top = _worker_top(profile, "spy_burst", "fleet, bursts")
        text += (
            f" Profiles ({profile.get('pool')}): a fleet job takes {fmt(fleet_cpu)} ms of CPU "
            f"in bursts against bare Celery's {fmt(bare_cpu)} (the CPU table), which alone "
            f"predicts about x{fmt(bare_cpu / fleet_cpu, 2)}; the worker's share is "
            f"{fmt(_cpu_total(profile, 'fleet, bursts', 'worker (main + pool)'))} ms against "
            f"{fmt(_cpu_total(profile, 'bare Celery, bursts', 'worker (main + pool)'))}"
            + (f" (largest: {top})" if top else "")
            + "."
        )
    text += (
        " In the way: with task events, the STARTED state and extended results off, fleet "
        "and no-op share the same Celery configuration, so the gap is the fleet's own work "
        "per job, which the no-op does not do: the HTTP call to Ollama, two `ml_results` "
        "rows, the job contracts, the metrics, all on the same 2 cores as the broker and "
        "Redis."
    )
    return text


def _memory(missed: list[Outcome], outcomes: Sequence[Outcome], cfg: Config) -> str:
    parts = []
    for s4 in missed:
        pool = s4.extra["pool"]
        children = int(_x(s4, "fleet_processes")) - 1
        text = (
            f"{pool}: {fmt(_x(s4, 'fleet_end_rss'), 0)} MB RSS summed over the main process "
            f"and {children} children; the PSS sum, what the node really holds once pages "
            f"shared between forked processes are split, is {fmt(_x(s4, 'fleet_end_pss'), 0)} "
            "MB" + (", within the target" if _x(s4, "fleet_end_pss") <= _MEMORY_TARGET_MB else "")
        )
        if "base_end_rss" in s4.extra:
            text += (
                f"; bare Celery's {pool} worker alone holds {fmt(_x(s4, 'base_end_rss'), 0)} MB RSS"
            )
        parts.append(text)
    others = [p for p in _ran(outcomes, cfg) if all(o.extra["pool"] != p for o in missed)]
    within = [o for o in (_find(outcomes, "4", p) for p in others) if o is not None]
    growth = [o for o in outcomes if o.key == "4" and _x(o, "fleet_growth_pct") > 10.0]
    return (
        f"- **4, memory** ({'; '.join(parts)}; target {_MEMORY_TARGET_MB:.0f} MB). In the way: "
        + (
            "one Celery worker process per slot, each a copy of the whole worker, counted in "
            f"RSS once per process, at concurrency {cfg.concurrency}."
            if all(o.extra["pool"] == "prefork" for o in missed)
            else "the worker's own memory (the bare Celery figure is its floor)."
        )
        + "".join(
            f" The {o.extra['pool']} pool holds {fmt(_x(o, 'fleet_end_rss'), 0)} MB at the "
            "same concurrency (the pool section)."
            for o in within
        )
        + " Fewer processes shrink it too: concurrency should follow Ollama's parallel slots "
        "anyway."
        + (
            " Growth stays under 10% in every pool."
            if not growth
            else " Growth above 10%: " + ", ".join(str(o.extra["pool"]) for o in growth) + "."
        )
    )


def _standing(outcomes: Sequence[Outcome], profile: dict[str, Any], cfg: Config) -> list[str]:
    """Per missed target: the measured figure, the profile evidence, what stands in the way."""
    pools = list(dict.fromkeys([cfg.default_pool, *cfg.pools]))
    lines = []
    if missed := _missed(outcomes, "1", pools):
        lines.append(_overhead(missed, profile))
    if missed := _missed(outcomes, "2", pools):
        lines.append(_saturation(missed, outcomes))
    if missed := _missed(outcomes, "3", pools):
        lines.append(_dispatch(missed, profile))
    if missed := _missed(outcomes, "4", pools):
        lines.append(_memory(missed, outcomes, cfg))
    for s5 in _missed(outcomes, "5", pools):
        lines.append(
            f"- **5, scale-out** (x{fmt(_x(s5, 'ratio'), 3)}, target 1.8): two nodes on one "
            "2-core machine share its CPU, broker and Redis; on separate hosts each node has "
            "its own."
        )
    if not lines:
        return []
    return [
        "## What stands in the way of each target",
        "",
        "Each missed target, first in the default pool: the figure measured, what the "
        "profiles show, and what stands in the way.",
        "",
        *lines,
        "",
    ]


def discussion(outcomes: Sequence[Outcome], profile: dict[str, Any], cfg: Config) -> list[str]:
    """Pool choice, where the time goes, the fixes, and what stands in the way."""
    parts: list[str] = [*_pools(outcomes, cfg)]
    if "pool" in profile:
        parts += [
            "## Where the fleet's time goes",
            "",
            f"Profiled on an instant simulator, one worker `--pool {profile['pool']} "
            f"--concurrency {profile.get('concurrency', '?')}` (the default pool).",
            "",
            *_cpu(profile),
            "### Profiles",
            "",
            *_spy(profile),
            *_producer(profile),
            *_wire(profile),
            *_micro(profile),
        ]
    parts += _fixes(profile)
    parts += _standing(outcomes, profile, cfg)
    return parts
