"""What a scenario reports, and BENCHMARKS.md: ``bench/BENCHMARKS.md.in`` with its ``{{name}}``
placeholders filled, each generated table between ``<!-- bench:name -->`` markers so that
``--render`` can fill an edited template with the last run's tables."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TEMPLATE", "Outcome", "Row", "blocks", "cpu_table", "fill", "fmt", "median", "outcome"]
__all__ += ["percentile", "read_blocks", "span", "table", "updated"]

TEMPLATE = Path(__file__).with_name("BENCHMARKS.md.in")
_NOT_RUN = "_Not measured in this run._"
_COMPARED = ["difference / ratio", "target", "met?"]
_WHOLE_RUN = ("machine", "summary")  # of every part; ``updated`` keeps them


@dataclass
class Row:
    """One compared figure: medians over repetitions unless ``metric`` says otherwise."""

    metric: str
    baseline: str
    fleet: str
    compared: str = ""
    target: str = "(information)"
    met: bool | None = None

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("**yes**" if self.met else "**no**")
        return [self.metric, self.baseline, self.fleet, self.compared, self.target, met]


@dataclass
class Outcome:
    """One scenario (or one pool's run of it): the table, the repetitions, the figures."""

    key: str
    title: str
    baseline_name: str
    fleet_name: str
    rows: list[Row] = field(default_factory=list)
    reps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return math.nan
    ordered, rank = sorted(values), (len(values) - 1) * q / 100.0
    low = math.floor(rank)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def span(values: Sequence[float], digits: int = 2) -> str:
    """A median with the lowest and highest repetition: ``19.39 (19.10-19.52)``."""
    if not values:
        return "n/a"
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats get two decimals."""

    def cell(value: Any) -> str:
        return fmt(value) if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def outcome(o: Outcome) -> str:
    """A scenario's heading, table, notes and repetitions."""
    header = ["metric", o.baseline_name, o.fleet_name, *_COMPARED]
    parts = [f"#### {o.title}", "", table(header, [r.cells() for r in o.rows])]
    parts += [p for n in o.notes for p in ("", n)]
    if o.reps:
        label = "Samples" if o.key == "4" else "Repetitions"
        reps = table(list(o.reps[0]), [list(rep.values()) for rep in o.reps])
        parts += ["", f"<details><summary>{label}</summary>", "", reps, "", "</details>"]
    return "\n".join(parts)


def _pools(outcomes: Sequence[Outcome], pools: Sequence[str], default: str) -> str:
    rows = []
    for pool in pools:
        got = {o.key: o.extra for o in outcomes if o.extra.get("pool") == pool}

        def x(key: str, name: str, got: dict[str, Any] = got) -> float:
            return float(got.get(key, {}).get(name, math.nan))

        p50, p99 = x("1", "fleet p50"), x("1", "fleet p99")
        added = f"+{fmt(p50 - x('1', 'direct p50'))} / +{fmt(p99 - x('1', 'direct p99'))}"
        rows.append(
            [
                f"{pool} (default)" if pool == default else pool,
                f"{fmt(p50)} / {fmt(p99)} ({added})",
                f"{fmt(x('2', 'fleet'))} (x{fmt(x('2', 'ratio'), 3)})",
                f"{fmt(x('3', 'fleet'), 1)} (x{fmt(x('3', 'ratio'), 3)})",
                f"{fmt(x('4', 'fleet_end_rss'), 0)} / {fmt(x('4', 'fleet_end_pss'), 0)}",
                *(fmt(x("4", k), d) for k, d in (("base_end_rss", 0), ("fleet_growth_pct", 1))),
                fmt(x("4", "fleet_rate"), 0),
            ]
        )
    header = ["pool", "1: p50 / p99 ms (over direct)", "2: jobs/s (ratio to direct)"]
    header += ["3: jobs/s (ratio to bare Celery)", "4: RSS / PSS MB at the end"]
    return table([*header, "4: bare Celery RSS MB", "4: growth %", "4: drain jobs/s"], rows)


def cpu_table(columns: dict[str, dict[str, float]]) -> str:
    """CPU per job by process group (rows), one column per measured run, and their sum."""
    names = list(dict.fromkeys(n for column in columns.values() for n in column))
    rows = [[n, *(fmt(c.get(n, math.nan)) for c in columns.values())] for n in names]
    rows.append(["**all of these**", *(f"**{fmt(sum(c.values()))}**" for c in columns.values())])
    return table(["process", *columns], rows)


def _spy(spy: dict[str, Any], worker_cpu: float) -> str:
    if "error" in spy:
        return f"py-spy: {spy['error']}"
    where = ", ".join(f"{k} {pct:.0f}%" for k, pct in spy["processes"].items())
    idle = f"; {spy['idle']} more of threads-pool threads waiting for their next job, left out"
    rows = [[n, f"{pct:.1f}%", fmt(pct / 100.0 * worker_cpu)] for n, pct in spy["shares"]]
    head = f"{spy['jobs']} jobs, {spy['samples']} samples ({where}){idle if spy['idle'] else ''}."
    return f"{head}\n\n{table(['activity', 'share of samples', '~CPU ms per job'], rows)}"


def _wire(wire: dict[str, Any], locks: dict[str, float]) -> str:
    rows: list[list[str]] = []
    if wire["strace"]:
        detail = ", ".join(f"{k} {fmt(v)}" for k, v in wire["connects"].items())
        opened = fmt(sum(wire["connects"].values())) + (f" ({detail})" if detail else "")
        rows.append(["TCP connections the worker opened", opened])
    rows.append(["new AMQP connections in the vhost (producer or worker)", fmt(wire["new_amqp"])])
    rows += [[f"worker {k}", fmt(v)] for k, v in wire["syscalls"].items()]
    rows += _traffic(wire, [[f"Redis, keyed job, {k}", fmt(v)] for k, v in locks.items()])
    return table(["what", "per job"], rows)


def _traffic(wire: dict[str, Any], keyed: list[list[str]]) -> list[list[str]]:
    """Rows of Redis commands (then ``keyed``'s) and AMQP socket operations, by side."""
    rows = [[f"Redis, {k}", fmt(v)] for k, v in wire["redis"].items()] + keyed
    what = "AMQP socket reads / writes counted by the broker"
    amqp = wire["amqp"].items()
    return rows + [[f"{what}, {side}", f"{fmt(r)} / {fmt(w)}"] for side, (r, w) in amqp]


def blocks(
    outcomes: Sequence[Outcome],
    profile: dict[str, Any],
    pools: Sequence[str],
    machine: Sequence[tuple[str, str]],
    notices: Sequence[str],
) -> dict[str, str]:
    """Every generated table of the report, by placeholder name."""
    found = dict.fromkeys(("producer", "wire", "gateway_wire", "lock", "micro", "fixes"), _NOT_RUN)
    found["machine"] = "\n\n".join([table(["", ""], machine), *notices])
    rows = [[o.title, *r.cells()] for o in outcomes for r in o.rows if r.met is not None]
    header = ["scenario", "metric", "baseline", "fleet", *_COMPARED]
    found["summary"] = table(header, rows) if rows else _NOT_RUN
    scenarios = (
        *("1", "2", "2j", "3", "4", "5", "6", "7", "8", "9"),
        *("gateway", "embed", "batch", "1r", "2r"),
    )
    for key in scenarios:
        found[key] = "\n\n".join(outcome(o) for o in outcomes if o.key == key) or _NOT_RUN
    pooled = {o.extra.get("pool") for o in outcomes if o.key in ("1", "2", "3", "4")}
    ran = [p for p in pools if p in pooled]
    found["pools"] = _pools(outcomes, ran, pools[0]) if ran else _NOT_RUN
    cpu = profile.get("cpu", {})
    found["cpu"] = cpu_table(cpu) if cpu else _NOT_RUN
    for key, column in (("spy_sequential", "fleet, sequential"), ("spy_burst", "fleet, bursts")):
        worker = cpu.get(column, {}).get("worker (main + pool)", math.nan)
        found[key] = _spy(profile[key], worker) if key in profile else _NOT_RUN
    if producer := profile.get("producer"):
        parts = table(["part", "ms per job"], [[n, fmt(ms)] for n, ms in producer["parts"]])
        each = f"{producer['jobs']} calls, {fmt(producer['wall_ms_per_job'])} ms each"
        found["producer"] = f"{each} under the profiler. Wall time per job:\n\n{parts}"
    if wire := profile.get("wire"):
        found["wire"] = f"{wire['jobs']} jobs.\n\n" + _wire(wire, profile.get("lock_commands", {}))
    if wire := profile.get("gateway_wire"):
        rows = [*_traffic(wire, []), ["new AMQP connections in the vhost", fmt(wire["new_amqp"])]]
        head = f"{wire['requests']} streamed requests."
        found["gateway_wire"] = f"{head}\n\n" + table(["what", "per request"], rows)
    if lock := profile.get("lock_latency"):
        rows = [["with an idempotency key (a singleton lock)", fmt(lock["keyed"])]]
        rows += [["without", fmt(lock["plain"])]]
        found["lock"] = table(["sequential jobs", "p50 ms"], rows)
    if micro := profile.get("micro"):
        rows = [[n, fmt(ms, 3), how] for n, ms, how in micro]
        found["micro"] = table(["operation", "median ms", "how often per job"], rows)
    if fixes := profile.get("fixes"):
        fixes[0][3] = fixes[0][5] = "-"  # the current fleet itself
        header = ["variant", "what changed", "p50 ms", "p50 vs current (ms, + slower)", "jobs/s"]
        found["fixes"] = table([*header, "jobs/s vs current"], fixes)
    return found


def fill(template: str, tables: dict[str, str], values: dict[str, str]) -> str:
    """The template with each ``{{name}}`` replaced: a table between markers, or a value."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)  # a KeyError names a placeholder with neither table nor value
        if name in tables:
            return f"<!-- bench:{name} -->\n{tables[name]}\n<!-- /bench:{name} -->"
        return values[name]

    return re.sub(r"\{\{(\w+)\}\}", replace, template).rstrip() + "\n"


def read_blocks(text: str) -> dict[str, str]:
    """The tables of a report ``fill`` wrote, by name."""
    return dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)\n<!-- /bench:\1 -->", text, re.S))


def updated(kept: dict[str, str], fresh: dict[str, str], titles: Sequence[str]) -> dict[str, str]:
    """``kept`` with the tables and summary rows of the parts a run measured; the rest as kept."""
    tables = kept | {k: v for k, v in fresh.items() if v != _NOT_RUN and k not in _WHOLE_RUN}
    heads = tuple(f"| {title.split(' (')[0]}" for title in titles)
    summaries = (kept["summary"], fresh["summary"])
    old, new = ([] if t == _NOT_RUN else t.splitlines() for t in summaries)
    rows = [line for line in old[2:] if not line.startswith(heads)] + new[2:]
    tables["summary"] = "\n".join((old or new)[:2] + rows) if rows else _NOT_RUN
    return tables
