"""The gateway scenario (issue 15): a streamed ``/api/generate`` through avocado-infer (the
gateway, the queue, a worker, its Redis stream) against the same request straight to the
simulator, one stream at a time and 16 at once: time to first token and total time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import psutil

from bench.profile import cpu_ms, servers
from bench.report import Outcome, Row, cpu_table, fmt, median, percentile
from bench.scenarios import Config, alternate, parallel
from bench.services import MODEL, BenchEnv, process_tree

__all__ = ["STREAMS", "gateway"]

STREAMS = 16
"""Concurrent streams of the concurrent half; the worker's threads and the simulator's slots."""
_TARGET_MS = 10.0  # issue 15: added time to first token at p50
Timing = tuple[float, float]  # (time to first token, total) in ms
_WHAT = ((0, "TTFT"), (1, "total"))


def _streamed(client: httpx.Client, url: str, prompt: str) -> tuple[Timing, str]:
    """One streamed ``/api/generate``: its timing and the text it gave."""
    body = {"model": MODEL, "prompt": prompt}
    start, first, text = time.perf_counter(), 0.0, list[str]()
    with client.stream("POST", f"{url}/api/generate", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("response") and not text:
                first = time.perf_counter()
            text.append(chunk.get("response", ""))
            if chunk.get("done"):
                break
    if not first:
        raise RuntimeError(f"{url}: an answer without text")
    return (1000.0 * (first - start), 1000.0 * (time.perf_counter() - start)), "".join(text)


def _caller(client: httpx.Client, urls: dict[str, str]) -> Callable[[str, int], Timing]:
    """Job ``i`` of a side; the gateway's answer must be the simulator's, token for token."""
    direct: dict[int, str] = {}

    def call(side: str, i: int) -> Timing:
        prompt = f"bench gateway {i % 64}"
        timing, text = _streamed(client, urls[side], prompt)
        if direct.setdefault(i % 64, text) != text:
            raise RuntimeError(f"{side} answered {text!r} to {prompt!r}, not {direct[i % 64]!r}")
        return timing

    return call


def _figures(run: list[Timing]) -> dict[str, float]:
    """p50 and p99 of one repetition's TTFT and total."""
    return {
        f"{what} p{q}": percentile([t[k] for t in run], q) for k, what in _WHAT for q in (50, 99)
    }


def gateway(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Both sides share one httpx client; the worker has a thread per stream, the simulator a
    slot per stream, so neither queues at 16 streams."""
    sim = env.start_sim(parallel=STREAMS, tokens_per_s=cfg.gateway_rate)
    worker = env.start_worker(pool=pool, concurrency=STREAMS, ollama_url=sim.url)
    gateway = env.start_gateway()
    urls = {"direct": sim.url, "gateway": gateway.url}
    groups = {
        "gateway (avocado-infer)": [psutil.Process(gateway.pid)],
        "worker (main + pool)": process_tree(worker),
        "simulator": [psutil.Process(sim.pid)],
        "harness: the client": [psutil.Process()],
        **servers(),
    }
    client = env.closing(httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64)))
    sides = {side: partial(_caller(client, urls), side) for side in urls}
    modes = {
        "sequential": (1, cfg.gateway_jobs),
        f"{STREAMS} concurrent": (STREAMS, cfg.gateway_burst),
    }
    for side in sides.values():  # warm: clients, connections, the worker's threads
        parallel([side] * STREAMS, 2 * STREAMS)
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    cpu: dict[str, dict[str, float]] = {}  # ms per answer, by side and mode, then process

    def run(mode: str, side: str) -> Callable[[int], None]:
        streams, jobs = modes[mode]
        each, used = got.setdefault((mode, side), []), cpu.setdefault(f"{side}, {mode}", {})

        def one(_: int) -> None:
            timings: list[Timing] = []
            spent = cpu_ms(
                groups, lambda: timings.extend(parallel([sides[side]] * streams, jobs)[1])
            )
            each.append(_figures(timings))
            for name, ms in spent.items():
                used[name] = used.get(name, 0.0) + ms / jobs / cfg.reps

        return one

    for mode in modes:
        alternate(cfg.reps, run(mode, "direct"), run(mode, "gateway"))
    rows, reps, extra = list[Row](), list[dict[str, Any]](), dict[str, Any](pool=pool)
    for mode in modes:
        for key in got[mode, "direct"][0]:
            base, mine = (median([rep[key] for rep in got[mode, side]]) for side in urls)
            extra |= {f"{mode} direct {key}": base, f"{mode} gateway {key}": mine}
            row = Row(f"{mode}: {key} (ms)", fmt(base), fmt(mine), f"{mine - base:+.2f} ms")
            if key == "TTFT p50":
                row.target, row.met = f"difference <= {_TARGET_MS:g} ms", mine - base <= _TARGET_MS
            rows.append(row)
        for i in range(cfg.reps):
            figures = {f"{side} {k} ms": v for side in urls for k, v in got[mode, side][i].items()}
            reps.append({"rep": i + 1, "mode": mode} | figures)
    title = f"Gateway ({pool}, {STREAMS} worker threads, {cfg.gateway_rate:g} tokens/s)"
    sides_named = ("direct to the simulator", "through avocado-infer")
    note = f"CPU per answer (ms), user + system, by process:\n\n{cpu_table(cpu)}"
    return Outcome("gateway", title, *sides_named, rows, reps, [note], extra | {"cpu": cpu})
