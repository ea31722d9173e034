"""The prose of BENCHMARKS.md: pool choice, profiles and fixes, written from the measured figures.

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


def _pools(outcomes: Sequence[Outcome], cfg: Config) -> list[str]:
    pools = [p for p in cfg.pools if any(o.extra.get("pool") == p for o in outcomes)]
    if len(pools) < 2:
        return []
    rows = []
    for pool in pools:
        s1, s2, s4 = (_find(outcomes, k, pool) for k in ("1", "2", "4"))
        rows.append(
            [
                pool,
                f"{fmt(_x(s1, 'fleet50'))} / {fmt(_x(s1, 'fleet99'))}",
                f"{fmt(_x(s2, 'fleet'))} (x{fmt(_x(s2, 'ratio'), 3)})",
                f"{fmt(_x(s4, 'fleet_end_rss'), 0)} / {fmt(_x(s4, 'fleet_end_pss'), 0)}",
                fmt(_x(s4, "fleet_growth_pct"), 1),
                fmt(_x(s4, "fleet_rate"), 0),
            ]
        )
    prefork = {k: _find(outcomes, k, "prefork") for k in ("1", "2", "4")}
    threads = {k: _find(outcomes, k, "threads") for k in ("1", "2", "4")}
    text = [
        "## Worker pool and concurrency",
        "",
        f"Scenarios 1, 2 and 4 ran once per pool, all at concurrency {cfg.concurrency}:",
        "",
        _table(
            [
                "pool",
                "1: p50 / p99 ms",
                "2: jobs/s (ratio to direct)",
                "4: RSS / PSS MB at the end",
                "4: growth %",
                "4: drain jobs/s",
            ],
            rows,
        ),
        "",
    ]
    if prefork["4"] is not None and threads["4"] is not None:
        text += [
            "What the figures say: the pools keep a 200 ms model equally busy (scenario 2: "
            f"prefork x{fmt(_x(prefork['2'], 'ratio'), 3)}, threads "
            f"x{fmt(_x(threads['2'], 'ratio'), 3)} of direct). For an LLM job the worker "
            "spends almost all its time waiting on Ollama, so the pool does not limit "
            "throughput; it sets the memory and what happens when a job misbehaves. Threads "
            f"hold {fmt(_x(threads['4'], 'fleet_end_rss'), 0)} MB RSS in one process against "
            f"prefork's {fmt(_x(prefork['4'], 'fleet_end_rss'), 0)} MB summed over five "
            f"(PSS {fmt(_x(prefork['4'], 'fleet_end_pss'), 0)} MB: most of prefork's RSS is "
            "pages the forked children share with the main process).",
            "",
        ]
    text += [
        "**Recommendation: keep `prefork` as the default pool, with `--concurrency` equal to "
        "the number of requests the node's Ollama serves at once (`OLLAMA_NUM_PARALLEL`; 1 "
        "on a small notebook GPU).** The reasons, in order:",
        "",
        "1. Time limits. The fleet's soft and hard time limits (`JobTimedOut`, the hard kill "
        "of a job that ignores it, both in the README's reliability table and below "
        "RabbitMQ's `consumer_timeout`) are enforced only by the prefork pool: Celery's "
        "threads pool ignores `soft_time_limit` and `time_limit` altogether, so a hung "
        "Ollama stream would hold its slot until the broker's consumer timeout closes the "
        "channel. The gevent pool enforces only the hard limit (a `gevent.Timeout`), not "
        "the soft one behind `JobTimedOut`, and needs the whole worker monkey-patched "
        "(SQLite, psycopg, pyngrok's subprocess and the node thread included), which "
        "nothing in the test suite covers.",
        "2. Isolation. A job that leaks or crashes takes down one child, which billiard "
        "replaces and whose message RabbitMQ redelivers (`reject_on_worker_lost`); with "
        "threads it takes the whole node.",
        "3. CPU. A job's own Python work (result rows, result backend, events) runs in the "
        "children, on both cores; with threads it shares one GIL with the consumer loop. "
        "Where the work is all bookkeeping (scenario 4's instant simulator) prefork drains "
        f"{fmt(_x(prefork['4'], 'fleet_rate'), 0)} jobs/s against threads' "
        f"{fmt(_x(threads['4'], 'fleet_rate'), 0)}.",
        "4. Concurrency above Ollama's parallel slots buys nothing: the extra jobs only wait "
        "in Ollama's queue while holding a prefetched message. Scenario 2 shows 4 processes "
        "keeping 4 slots busy; scenario 5 shows the way to more throughput is more nodes.",
        "",
        "Where threads would be the better default: a memory-tight host (a free notebook) "
        "running a high concurrency against a remote Ollama. Until time limits are enforced "
        "another way there (a watchdog on the httpx stream's total time, say), prefork stays "
        "the default and threads an option (`--pool threads`).",
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
            f"py-spy (`record --subprocesses --nonblocking`, {spy['rate']} Hz) over the worker's "
            f"main process and pool children while {spy['jobs']} jobs ran; {spy['samples']} "
            f"samples ({where}). A sample goes to the first activity its stack contains, "
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


def _fixes_table(profile: dict[str, Any]) -> list[str]:
    fixes = profile.get("fixes")
    if not fixes:
        return []
    header = ["variant", "applied", "p50 ms", "p50 saved ms", "jobs/s", "jobs/s vs unchanged"]
    rows = [
        [
            r["variant"],
            r["fixes"],
            fmt(r["p50 ms"]),
            fmt(r["p50 saved ms"]),
            fmt(r["jobs/s"], 1),
            f"x{fmt(r['jobs/s gain'], 2)}",
        ]
        for r in fixes
    ]
    return [
        "### Fixes measured end to end",
        "",
        "Each fix applied to the real `ollama_worker` app from outside (`bench/fleet_app.py`, "
        "`BENCH_FIXES=...`; for `events` the producer's `task_send_sent_event` is off too), one "
        f"worker per variant (`--pool {profile.get('fix_pool')}`), switched on in turn with "
        f"`add_consumer` / `cancel_consumer`; {profile.get('fix_seq')} sequential jobs (p50) "
        f"and a burst of {profile.get('fix_burst')} (jobs/s) per variant and repetition, "
        "alternating, medians. The bare Celery no-op worker ran in the same rotation. A "
        "single fix moves p50 by about a millisecond, close to the run-to-run noise of a "
        "loaded 2-core machine; the four together are the figure to trust.",
        "",
        _table(header, rows),
        "",
    ]


def _fix_row(profile: dict[str, Any], names: str) -> dict[str, Any] | None:
    for row in profile.get("fixes") or []:
        if row["fixes"] == names:
            return dict(row)
    return None


def _micro_ms(profile: dict[str, Any], start: str) -> float:
    for name, ms, _ in profile.get("micro") or []:
        if name.startswith(start):
            return float(ms)
    return math.nan


def _recommendations(outcomes: Sequence[Outcome], profile: dict[str, Any]) -> list[str]:
    """The fixes, each with the cost it removes as measured in this run."""
    if not profile.get("fixes") and not profile.get("micro"):
        return []

    def saved(names: str) -> str:
        row = _fix_row(profile, names)
        if row is None:
            return "not measured in this run"
        text = (
            f"p50 {-row['p50 saved ms']:+.2f} ms per sequential job, burst throughput "
            f"x{fmt(row['jobs/s gain'], 2)}"
        )
        if row["p50 saved ms"] < 1.0 and row["jobs/s gain"] < 1.05:
            text += " (alone, within this machine's run-to-run noise: see the combined row)"
        return text

    confirm = _micro_ms(profile, "event-sized publish to RabbitMQ, with confirm")
    unconfirmed = _micro_ms(profile, "event-sized publish to RabbitMQ, without confirm")
    full = _micro_ms(profile, "`ml_results` upsert, SQLite WAL, synchronous=FULL")
    normal = _micro_ms(profile, "`ml_results` upsert, SQLite WAL, synchronous=NORMAL")
    store = _micro_ms(profile, "Celery Redis backend")
    lock = profile.get("lock_latency") or {}
    producer_parts = dict((profile.get("producer") or {}).get("parts", []))
    event_ms = producer_parts.get("`task-sent` event: publish and wait for its confirm", math.nan)
    publish_ms = producer_parts.get(
        "job message: publish and wait for the broker's confirm", math.nan
    )
    rows_share = next(
        (
            pct
            for name, _, pct in (profile.get("spy_burst") or {}).get("categories", [])
            if name.startswith("ml_results")
        ),
        math.nan,
    )
    everything = _fix_row(profile, "events,tracking,startrow,sqlite")
    bare = _fix_row(profile, "(the dispatch baseline)")
    lines = [
        "## Recommended fixes, with what each removes",
        "",
        "Nothing outside `bench/` was changed; each fix below is a change to make in the "
        "package, with the cost it removes as measured in this run (end to end through "
        "`bench/fleet_app.py` where it could be applied from outside, alone otherwise).",
        "",
        "1. **Stop forcing task events on** (`worker_send_task_events` and "
        "`task_send_sent_event` in `avocado_shared/celery_config.py`). Per job the producer "
        "publishes `task-sent` and the worker's main process `task-received`, "
        "`task-started` and `task-succeeded`, each waiting for a publisher confirm because "
        f"the broker transport has `confirm_publish` on: {fmt(confirm, 3)} ms each alone "
        f"({fmt(unconfirmed, 3)} ms unconfirmed), {fmt(event_ms)} ms of every "
        "`Producer.generate` call, and the worker's event loop is blocked during the three "
        f"others. Removing them: {saved('events')}. Flower still works: it turns events on "
        "in the workers with its `enable_events` remote control when it starts (its default), "
        "so only a node watched by Flower pays for them.",
        "2. **Drop the STARTED state from the result backend** (`task_track_started`). It "
        "costs one more Redis write per job, and Celery's Redis backend reads the stored "
        f"state before every write (GET, then MULTI/SETEX/PUBLISH/EXEC): {fmt(store, 3)} ms "
        f"per write alone. Removing it: {saved('tracking')}. `ml_results` already records "
        "STARTED durably for `avocado result`; `JobHandle.state` would go PENDING -> "
        "SUCCESS.",
        "3. **Write the STARTED row only when it says something**: on a redelivery or a retry "
        "(`request.delivery_info['redelivered']` or `request.retries > 0`). The terminal "
        "upsert already inserts a new row with `attempts = 1`, so counts stay right; a first "
        "attempt still running just has no row yet (Flower shows running jobs while it runs). "
        f"The row costs one upsert and one fsync: {fmt(full, 3)} ms alone; "
        f"the two `ml_results` rows of a job take {fmt(rows_share, 0)}% of the worker's CPU "
        f"under bursts (profiles above). End to end: {saved('startrow')}.",
        "4. **SQLite `PRAGMA synchronous=NORMAL`** in `ResultStore._connect_sqlite` (WAL "
        "mode stays). With the default FULL every commit fsyncs the WAL (2 per job with the "
        f"STARTED row): {fmt(full, 3)} ms per upsert against {fmt(normal, 3)} ms. In WAL mode "
        "NORMAL loses no committed row when a worker crashes or is SIGKILLed, only on a power "
        "or kernel failure, the same promise Redis's `appendfsync everysec` gives the results "
        f"beside it. End to end: {saved('sqlite')}. (PostgreSQL deployments are unaffected.)",
    ]
    if everything is not None:
        gap = ""
        if bare is not None:
            gap = (
                f"; bare Celery in the same rotation: p50 {fmt(bare['p50 ms'])} ms, "
                f"{fmt(bare['jobs/s'], 1)} jobs/s, so all four bring the dispatch ratio to "
                f"x{fmt(everything['jobs/s'] / bare['jobs/s'], 2)}"
            )
        lines.append(
            f"\nAll four together: p50 {fmt(everything['p50 ms'])} ms "
            f"(-{fmt(everything['p50 saved ms'])} ms), {fmt(everything['jobs/s'], 1)} jobs/s "
            f"(x{fmt(everything['jobs/s gain'], 2)}){gap}."
        )
    evals = (profile.get("lock_commands") or {}).get("worker: EVAL lock", math.nan)
    twice = (
        f" The worker runs {fmt(evals, 0)} EVALs per keyed job: one refresh when it starts "
        "and the release twice, once in `JobTask.finish` (before the result is published, "
        "on purpose) and again in celery-singleton's `on_success`; overriding `on_success` "
        "to skip the second saves one Redis round trip per keyed job."
        if evals >= 2.5
        else ""
    )
    lines += [
        "",
        "Smaller or inherent costs, measured but not worth a change now:",
        "",
        f"- Singleton lock: only keyed jobs (a summary's `share_id`, a generation's "
        "`idempotency_key`) take it: a SET NX when published, EVAL scripts when started and "
        f"done; p50 {fmt(lock.get('keyed', math.nan))} ms keyed against "
        f"{fmt(lock.get('plain', math.nan))} ms without (alternating, same run). Unkeyed "
        f"generations pay nothing.{twice}",
        f"- Prometheus metrics (prometheus_client multiprocess files, on by default): "
        f"{saved('metrics')}. Observability worth keeping.",
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
        "- The prefork pool's pipes (billiard) show in the worker profile; the threads pool "
        "removes them but loses time limits (see the pool section).",
        "- httpx logs one INFO line per request to Ollama (`HTTP Request: POST ...`) beside "
        "Celery's own two; logging is a small share in the profiles, so it can wait.",
    ]
    lines += [
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
    return lines


def _standing(outcomes: Sequence[Outcome]) -> list[str]:
    """Per missed target: the figure, with the fixes, and what stands in the way."""
    s1, s2, s3 = (_find(outcomes, k, "prefork") for k in ("1", "2", "3"))
    s4 = _find(outcomes, "4", "prefork")
    lines = ["## What stands in the way of each target", ""]
    if s1 is not None:
        direct50, fleet50, bare50 = _x(s1, "direct50"), _x(s1, "fleet50"), _x(s1, "bare50")
        fixed50 = _x(s1, "fixed50")
        own = fleet50 - direct50 - bare50
        text = (
            f"- **1, overhead** (+{fmt(fleet50 - direct50)} ms at p50, budget 3 ms). A fleet "
            f"job is a Celery round trip plus one Ollama call plus what the fleet adds. The "
            f"round trip alone, a bare Celery no-op on the same broker, quorum queue, "
            f"confirms and Redis backend, takes {fmt(bare50)} ms at p50 here "
            f"({fmt(_x(s1, 'bare99'))} ms at p99); the fleet's own additions are the rest, "
            f"about {fmt(own)} ms."
        )
        if not math.isnan(fixed50):
            text += (
                f" Fixes 1-4 bring the fleet to +{fmt(fixed50 - direct50)} ms at p50 and "
                f"+{fmt(_x(s1, 'fixed99') - _x(s1, 'direct99'))} ms at p99."
            )
        if bare50 > 3.0:
            text += (
                " Since Celery's own round trip is already over the 3 ms budget on this "
                "machine, no tuning of the fleet meets it: that would take a cheaper path "
                "than a confirmed publish to a quorum queue plus a Redis write, read and "
                "publish for the result (for example results on RabbitMQ's direct reply-to, "
                "`rpc://`), a design change that trades away results surviving in Redis."
            )
        lines.append(text)
    if s2 is not None:
        text = (
            f"- **2, saturation** (x{fmt(_x(s2, 'ratio'), 3)}, target 0.95). With prefetch 1 "
            "and late acks each slot idles from the end of one generation until the next "
            "message arrives: result row, result backend, events, ack, delivery, dispatch "
            "to the child, STARTED writes. That per-job gap is scenario 1's overhead, paid "
            "once per 200 ms generation."
        )
        if "fixed_ratio" in s2.extra:
            text += f" With fixes 1-4: x{fmt(_x(s2, 'fixed_ratio'), 3)}."
        lines.append(text)
    if s3 is not None:
        text = (
            f"- **3, dispatch** (x{fmt(_x(s3, 'fleet') / _x(s3, 'bare'), 3)}, target 0.7). On "
            "2 cores the rate is set by CPU per job across producer, worker, RabbitMQ and "
            "Redis (the CPU table): a fleet job also makes an HTTP call and writes two "
            "SQLite rows, two result states and four confirmed events, where the no-op "
            f"writes one result. The no-op under the fleet's Celery configuration alone runs "
            f"at x{fmt(_x(s3, 'fleet_config') / _x(s3, 'bare'), 3)}: events, STARTED and "
            "extended results cost a quarter before any fleet code runs."
        )
        if "fixed" in s3.extra:
            text += f" With fixes 1-4: x{fmt(_x(s3, 'fixed') / _x(s3, 'bare'), 3)}."
        lines.append(text)
    if s4 is not None and _x(s4, "fleet_peak_rss") > 250:
        lines.append(
            f"- **4, memory** ({fmt(_x(s4, 'fleet_end_rss'), 0)} MB RSS summed over the main "
            f"process and 4 children, target 250). RSS counts every page the forked children "
            f"share with the main process once per process; the memory the node really holds "
            f"is the PSS sum, {fmt(_x(s4, 'fleet_end_pss'), 0)} MB"
            f"{', within the target' if _x(s4, 'fleet_end_pss') <= 250 else ''}. "
            + (
                f"Bare Celery's prefork worker alone holds {fmt(_x(s4, 'base_end_rss'), 0)} MB "
                "RSS at concurrency 4 (table above). "
                if "base_end_rss" in s4.extra
                else ""
            )
            + "Under 250 MB of RSS at concurrency 4 takes the threads pool (see the pool "
            "section) or fewer processes: concurrency should follow Ollama's parallel slots "
            "anyway. Growth stays far under 10% in every pool."
        )
    return lines


def discussion(outcomes: Sequence[Outcome], profile: dict[str, Any], cfg: Config) -> list[str]:
    """Pool choice, where the time goes, and the fixes."""
    parts: list[str] = [*_pools(outcomes, cfg)]
    if profile:
        parts += [
            "## Where the fleet's time goes",
            "",
            f"Profiled on an instant simulator, one worker `--pool {profile.get('pool', '?')} "
            f"--concurrency {profile.get('concurrency', '?')}`.",
            "",
            *_cpu(profile),
            "### Profiles",
            "",
            *_spy(profile),
            *_producer(profile),
            *_wire(profile),
            *_micro(profile),
            *_fixes_table(profile),
        ]
    parts += _recommendations(outcomes, profile)
    standing = _standing(outcomes)
    if len(standing) > 3:
        parts += standing
    return parts
