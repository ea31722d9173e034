"""``python -m bench``: every scenario against its baseline in services made for the run."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench import (
    batches,
    embeddings,
    fixes,
    gateway,
    profile,
    real_model,
    report,
    routing,
    scenarios,
    streams,
)
from bench.machine import LoadMonitor, describe_machine
from bench.services import REDIS_URL, REPO, BenchEnv

__all__ = ["SCENARIOS", "main"]

SCENARIOS = (
    *("1", "2", "3", "4", "5", "6", "7", "8", "9"),
    *("gateway", "embed", "batch", "real", "profile", "fixes"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the fleet.")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    what = "run only this part (repeatable): 1-5, gateway (avocado-infer against direct streams), "
    what += "embed (embeddings through the fleet against direct requests), "
    what += "batch (a batch through /v1/batches against plain saturation), "
    what += "real (1 and 2 on the embedded real model), profile (where the time goes), "
    what += "fixes (each applied fix undone); --quick: 1-5"
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help=what)
    default = ",".join(scenarios.POOLS)
    p.add_argument("--pools", help=f"pools of scenarios 1-4, comma-separated (default {default})")
    p.add_argument("--output", help="the report's file (default BENCHMARKS.md; a part: '-')")
    p.add_argument("--render", action="store_true", help="fill the template with --output's tables")
    what = "replace in --output (default BENCHMARKS.md) only the tables of the parts run"
    p.add_argument("--update", action="store_true", help=what)
    return p


def _values(cfg: scenarios.Config) -> dict[str, str]:
    """The template's ``{{name}}`` values: the run's sizes."""
    sizes = {k: v for k, v in asdict(cfg).items() if type(v) in (int, float)}
    sizes |= {"n_ctx": real_model.N_CTX, "tokens": real_model.TOKENS}
    return {k: f"{v:g}" for k, v in sizes.items()}


def _steps(env: BenchEnv, cfg: scenarios.Config, chosen: list[str]) -> list[tuple[str, Any]]:
    """(name, what runs it) of every part chosen, in order."""
    one = (scenarios.DEFAULT_POOL,)
    jittered = partial(scenarios.saturation, jitter_ms=scenarios.JITTER_MS)
    parts: list[tuple[str, str, Callable[..., Any], Sequence[str]]] = [
        ("1", "1 overhead", scenarios.overhead, cfg.pools),
        ("2", "2 saturation", scenarios.saturation, cfg.pools),
        ("2", "2 saturation, jittered", jittered, cfg.pools),
        ("3", "3 dispatch", scenarios.dispatch, cfg.pools),
        ("4", "4 memory", scenarios.memory, cfg.pools),
        ("5", "5 scale-out", scenarios.scale_out, one),
        ("6", "6 model mix", routing.model_mix, one),
        ("7", "7 lanes", routing.lanes, one),
        ("8", "8 drain", routing.drain, one),
        ("9", "9 sixteen streams", streams.sixteen_streams, one),
        ("gateway", "gateway", gateway.gateway, one),
        ("embed", "embeddings", embeddings.embeddings, one),
        ("batch", "batch", batches.batches, one),
        ("real", "1r real overhead", real_model.real_overhead, one),
        ("real", "2r real saturation", real_model.real_saturation, one),
        ("profile", "profile", profile.profile, one),
        ("fixes", "fixes", fixes.fixes, one),
    ]
    parts = [part for part in parts if part[0] in chosen]
    return [
        (f"{name}, {p}", partial(run, env, cfg, p)) for _, name, run, pools in parts for p in pools
    ]


def _attempt(step: Callable[[], Any], env: BenchEnv, log: Callable[[str], None]) -> Any:
    """A step's result; a failed step (RabbitMQ restarted, say) is tried once more."""
    for attempt in (1, 2):
        try:
            return step()
        except Exception as error:
            log(f"  failed: {type(error).__name__}: {error}" + ("; trying again" * (attempt == 1)))
            env.reset()
        finally:
            env.tidy()
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    pools = [p.strip() for p in args.pools.split(",")] if args.pools else None
    if pools and set(pools) - set(scenarios.POOLS):
        _parser().error(f"--pools: choose from {', '.join(scenarios.POOLS)}")
    cfg = scenarios.Config.make(args.quick, pools)
    subset = args.quick or args.scenario is not None
    output = args.output or ("-" if subset and not args.update else str(REPO / "BENCHMARKS.md"))
    if args.render:
        tables = report.read_blocks(Path(output).read_text())
        Path(output).write_text(report.fill(report.TEMPLATE.read_text(), tables, _values(cfg)))
        return 0
    chosen = args.scenario or (["1", "2", "3", "4", "5"] if args.quick else list(SCENARIOS))
    command = shlex.join([".venv/bin/python", "-m", "bench", *(argv or sys.argv[1:])])
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    cfg.log = log
    outcomes, profiled, failures = list[report.Outcome](), dict[str, Any](), list[str]()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleans up as Ctrl-C does
    with LoadMonitor() as load, BenchEnv() as env:
        log(f"vhost {env.vhost}, key prefix {env.key_prefix}, files in {env.tmp}")
        for name, step in _steps(env, cfg, chosen):
            log(f"scenario {name}")
            found = _attempt(step, env, log)
            if found is None:
                failures.append(name)
            elif isinstance(found, report.Outcome):
                outcomes.append(found)
                log("\n" + report.outcome(found))
            else:
                profiled.update(found)
    elapsed = time.monotonic() - started
    log(f"done in {elapsed:.0f}s; {load.summary()}")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = [*describe_machine(REDIS_URL), ("command", f"`{command}`")]
    machine += [("run", f"{when}, {elapsed / 60:.1f} min"), ("load", load.summary())]
    notices = [f"> Failed twice, not reported: {', '.join(failures)}."] if failures else []
    if load.foreign_mean() >= 0.1:
        notices.append(f"> Other processes used {load.foreign_mean():.2f} cores: figures noisy.")
    ordered = list(dict.fromkeys((scenarios.DEFAULT_POOL, *cfg.pools)))  # the default first
    if args.update:  # the machine table stays the full run's; this run's goes with its parts
        for found in outcomes:
            found.notes += [f"Measured by `{command}`, {when}; {load.summary()}.", *notices]
    tables = report.blocks(outcomes, profiled, ordered, machine, notices)
    if args.update:
        kept = report.read_blocks(Path(output).read_text())
        tables = report.updated(kept, tables, [o.title for o in outcomes])
    text = report.fill(report.TEMPLATE.read_text(), tables, _values(cfg))
    if output == "-":
        print(text)
    else:
        Path(output).write_text(text)
        log(f"wrote {output}")
    return 1 if failures else 0
