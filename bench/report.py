"""BENCHMARKS.md: machine, command, one table per scenario, pool choice, profiles, fixes."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.outcome import Outcome
from bench.stats import fmt

if TYPE_CHECKING:
    from bench.scenarios import Config

__all__ = ["render", "summary_lines", "table"]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats get two decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return fmt(value, 2) if not math.isnan(value) else "n/a"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _met(value: bool | None) -> str:
    return "" if value is None else ("**yes**" if value else "**no**")


def summary_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """One line per compared figure, for the console."""
    lines = []
    for outcome in outcomes:
        for row in outcome.rows:
            met = "" if row.met is None else ("MET" if row.met else "MISSED")
            lines.append(
                f"{outcome.title}: {row.metric}: {outcome.baseline_name} {row.baseline}, "
                f"{outcome.fleet_name} {row.fleet} ({row.compared}) target {row.target} {met}"
            )
    return lines


def _scenario(outcome: Outcome) -> str:
    parts = [f"### {outcome.title}", "", outcome.setup, ""]
    parts.append(
        table(
            [
                "metric",
                outcome.baseline_name,
                outcome.fleet_name,
                "difference / ratio",
                "target",
                "met?",
            ],
            [
                [r.metric, r.baseline, r.fleet, r.compared, r.target, _met(r.met)]
                for r in outcome.rows
            ],
        )
    )
    parts += ["", *outcome.notes] if outcome.notes else []
    if outcome.reps:
        header = list(outcome.reps[0])
        label = "Samples" if outcome.key == "4" else "Repetitions"
        parts += [
            "",
            f"<details><summary>{label}</summary>",
            "",
            table(header, [[rep[h] for h in header] for rep in outcome.reps]),
            "",
            "</details>",
        ]
    return "\n".join(parts)


def _summary(outcomes: Sequence[Outcome]) -> str:
    rows = []
    for outcome in outcomes:
        for row in outcome.rows:
            if row.met is None:
                continue
            rows.append(
                [
                    outcome.title,
                    row.metric,
                    row.baseline,
                    row.fleet,
                    row.compared,
                    row.target,
                    _met(row.met),
                ]
            )
    return table(
        ["scenario", "metric", "baseline", "fleet", "difference / ratio", "target", "met?"], rows
    )


def render(
    outcomes: Sequence[Outcome],
    profile: dict[str, Any],
    *,
    machine: Sequence[tuple[str, str]],
    command: str,
    load: str,
    foreign: float,
    elapsed: float,
    cfg: Config,
    failures: Sequence[str] = (),
) -> str:
    """The whole report."""
    from bench.discussion import discussion

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    noisy = foreign >= 0.1
    parts = [
        "# Benchmarks",
        "",
        "How much the fleet costs on top of calling Ollama directly (issue 6). Every figure "
        "below was measured in one run of the harness in `bench/`, each scenario against its "
        "baseline in the same run, alternating between the two, medians over the repetitions "
        "(ranges in brackets). Nothing here is a test: the unit and integration tests assert "
        "no timing.",
        "",
        "Reproduce (from the repository root, with RabbitMQ, Redis and `rabbitmqctl` on this "
        "machine; the harness makes its own vhost, Redis key prefix and temporary SQLite file, "
        "starts simulators and workers, and removes all of it afterwards):",
        "",
        "```bash",
        command,
        "```",
        "",
        "`--quick` runs a smoke version in under a minute, `--scenario N` (1-5, `real`, "
        "`profile`, `fixes`) runs one part; both print the report instead of writing this "
        "file unless `--output` says where.",
        "",
        "## Machine",
        "",
        table(["", ""], [*machine, ("run", f"{when}, {elapsed / 60:.1f} min"), ("load", load)]),
        "",
    ]
    if noisy:
        parts += [
            f"> Other processes used {foreign:.2f} cores on average during this run (other "
            "engineers' test suites on the same 2-core machine): absolute figures are noisy, "
            "ratios less so because fleet and baseline alternate. Re-run on a quiet machine "
            "before quoting the absolute numbers.",
            "",
        ]
    if failures:
        parts += [
            f"> Failed twice, not reported: {', '.join(failures)} (see the harness's log).",
            "",
        ]
    if outcomes:
        parts += ["## Summary", "", _summary(outcomes), "", "## Scenarios", ""]
    for outcome in outcomes:
        parts += [_scenario(outcome), ""]
    parts += discussion(outcomes, profile, cfg)
    return "\n".join(parts).rstrip() + "\n"
