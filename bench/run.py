"""One command for every benchmark: ``python -m bench`` or ``python bench/run.py``.

It makes its own vhost, Redis key prefix and temporary directory, starts simulators and
workers, runs each scenario against its baseline, alternating, and writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

if __package__ in (None, ""):  # run as a file: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scenarios
from bench.machine import LoadMonitor, describe_machine
from bench.outcome import Outcome
from bench.report import render, summary_lines
from bench.services import REDIS_URL, REPO, BenchEnv, terminate_as_interrupt

__all__ = ["SCENARIOS", "main"]

SCENARIOS = ("1", "2", "3", "4", "5", "real", "profile", "fixes")
_T = TypeVar("_T")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the fleet against direct Ollama calls and bare Celery.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run of scenarios 1-5 (under a minute); with --scenario profile "
        "or fixes, a short run of those",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this one (repeatable): 1-5, real (1 and 2 on the embedded real model), "
        "profile (py-spy, pyinstrument, wire counts) or fixes (each applied fix measured "
        "undone, and candidates not applied)",
    )
    p.add_argument(
        "--pools",
        default=None,
        help="worker pools compared in scenarios 1-4, comma-separated (default "
        f"{','.join(scenarios.POOLS)}; --quick: {scenarios.DEFAULT_POOL}); scenario 5, "
        "real, profile and fixes run the worker's default pool",
    )
    p.add_argument(
        "--output",
        default=None,
        help="where to write the report; default BENCHMARKS.md for a full run, none ('-') "
        "for --quick or --scenario",
    )
    return p


def _attempt(
    name: str, step: Callable[[], _T], env: BenchEnv, log: Callable[[str], None]
) -> _T | None:
    """Run a step; when it fails (another suite restarted RabbitMQ, say), clean up and try
    once more; ``None`` when the second try fails too."""
    for attempt in (1, 2):
        env.refresh()
        try:
            return step()
        except Exception as error:
            log(f"  {name} failed: {type(error).__name__}: {error}")
            env.reset()
            if attempt == 1:
                log(f"  {name}: trying again")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    default = [s for s in SCENARIOS if s.isdigit()] if args.quick else SCENARIOS
    chosen = list(dict.fromkeys(args.scenario or default))
    pools = [p.strip() for p in args.pools.split(",")] if args.pools else None
    if pools and set(pools) - set(scenarios.POOLS):
        _parser().error(f"--pools: choose from {', '.join(scenarios.POOLS)}")
    cfg = scenarios.Config.make(args.quick, pools)
    subset = args.quick or args.scenario is not None
    output = args.output or ("-" if subset else str(REPO / "BENCHMARKS.md"))
    command = " ".join(
        [".venv/bin/python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]
    )
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    cfg.log = log
    outcomes: list[Outcome] = []
    profile: dict[str, object] = {}
    failures: list[str] = []
    with terminate_as_interrupt(), LoadMonitor() as load, BenchEnv() as env:
        log(f"vhost {env.vhost}, key prefix {env.key_prefix}, files in {env.tmp}")
        steps: list[tuple[str, Callable[[], Outcome]]] = []
        for pool in cfg.pools if "1" in chosen else ():
            steps.append((f"1 overhead, {pool}", partial(scenarios.overhead, env, cfg, pool)))
        for pool in cfg.pools if "2" in chosen else ():
            steps.append((f"2 saturation, {pool}", partial(scenarios.saturation, env, cfg, pool)))
            steps.append(
                (
                    f"2 saturation, jittered, {pool}",
                    partial(scenarios.saturation, env, cfg, pool, scenarios.JITTER_MS),
                )
            )
        for pool in cfg.pools if "3" in chosen else ():
            steps.append((f"3 dispatch, {pool}", partial(scenarios.dispatch, env, cfg, pool)))
        for pool in cfg.pools if "4" in chosen else ():
            steps.append((f"4 memory, {pool}", partial(scenarios.memory, env, cfg, pool)))
        if "5" in chosen:
            steps.append(("5 scale-out", partial(scenarios.scale_out, env, cfg)))
        if "real" in chosen:
            from bench import real_model

            pool = cfg.default_pool
            steps.append(
                (f"1r real overhead, {pool}", partial(real_model.real_overhead, env, cfg, pool))
            )
            steps.append(
                (f"2r real saturation, {pool}", partial(real_model.real_saturation, env, cfg, pool))
            )
        for name, step in steps:
            log(f"scenario {name}")
            outcome = _attempt(name, step, env, log)
            if outcome is None:
                failures.append(name)
                continue
            outcomes.append(outcome)
            for line in summary_lines([outcome]):
                log(f"  {line}")
        if "profile" in chosen or "fixes" in chosen:
            from bench import profile as profiling

            if "profile" in chosen:
                log("profile")
                found = _attempt("profile", lambda: profiling.profile(env, cfg), env, log)
                profile.update(found or {})
                failures += [] if found else ["profile"]
            if "fixes" in chosen:
                log("fixes")
                found = _attempt("fixes", lambda: profiling.fixes(env, cfg), env, log)
                profile.update(found or {})
                failures += [] if found else ["fixes"]
    elapsed = time.monotonic() - started
    log(f"done in {elapsed:.0f}s; {load.summary()}")
    text = render(
        outcomes,
        profile,
        machine=describe_machine(REDIS_URL),
        command=command,
        load=load.summary(),
        foreign=load.foreign_mean(),
        elapsed=elapsed,
        cfg=cfg,
        failures=failures,
    )
    if output == "-":
        print(text)
    else:
        Path(output).write_text(text)
        log(f"wrote {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
