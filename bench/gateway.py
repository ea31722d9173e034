"""The gateway scenario (issue 15): a streamed ``/api/generate`` through avocado-infer against
the same request straight to the simulator, one stream and 16 at once: TTFT and total time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import psutil

from avocado_shared.streams import stream_key
from bench.profile import cpu_ms, servers
from bench.report import Outcome, Row, cpu_table, fmt, median, percentile
from bench.scenarios import Config, alternate, parallel
from bench.services import BenchEnv, process_tree
from bench.streamed import Answer, streamed

__all__ = ["STREAMS", "gateway"]

STREAMS = 16
"""Concurrent streams of the concurrent half; the worker's threads and the simulator's slots."""
# Issue 28: added time to first token at p50, one stream at a time and STREAMS at once.
_TARGET_MS = {"sequential": 5.0, f"{STREAMS} concurrent": 15.0}
_SPLIT = ("to the first stream entry", "first stream entry to client")


def _figures(env: BenchEnv, answers: list[Answer], split: bool) -> dict[str, float]:
    """TTFT and total p50/p99; ``split``: TTFT p50 in two at the first stream entry (Redis's ms)."""
    values = {w: [getattr(a, w.lower()) for a in answers] for w in ("TTFT", "total")}
    found = {f"{w} p{q}": percentile(v, q) for w, v in values.items() for q in (50, 99)}
    if not split:
        return found
    with contextlib.closing(env.redis()) as client, client.pipeline(transaction=False) as pipe:
        for answer in answers:
            pipe.xrange(stream_key(env.key_prefix, answer.job), count=1)
        written = [int(entries[0][0].split(b"-")[0]) for entries in pipe.execute()]
    parts = [(at - a.sent_at, a.first_at - at) for a, at in zip(answers, written, strict=True)]
    return found | {f"{n} p50": percentile([p[k] for p in parts], 50) for k, n in enumerate(_SPLIT)}


def gateway(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Both sides share one httpx client; a worker thread and a simulator slot per stream."""
    sim = env.start_sim(parallel=STREAMS, tokens_per_s=cfg.gateway_rate)
    worker = env.start_worker(pool=pool, concurrency=STREAMS, ollama_url=sim.url)
    gateway, secret = env.start_gateway()
    urls = {"direct": sim.url, "gateway": gateway.url}
    groups = {"gateway (avocado-infer)": [psutil.Process(gateway.pid)]}
    groups |= {"worker (main + pool)": process_tree(worker), "simulator": [psutil.Process(sim.pid)]}
    groups |= {"harness: the client": [psutil.Process()], **servers()}
    limits, auth = httpx.Limits(max_connections=64), {"Authorization": f"Bearer {secret}"}
    client = env.closing(httpx.Client(timeout=120, limits=limits, headers=auth))
    texts: dict[int, str] = {}  # the gateway's answer must be the simulator's, token for token
    sides = {side: partial(streamed, client, url, texts=texts) for side, url in urls.items()}
    together = (STREAMS, cfg.gateway_burst)
    modes = {"sequential": (1, cfg.gateway_jobs), f"{STREAMS} concurrent": together}
    for side in sides.values():  # warm: clients, connections, the worker's threads
        parallel([side] * STREAMS, 2 * STREAMS)
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    cpu: dict[str, dict[str, float]] = {}  # ms per answer, by side and mode, then process

    def run(mode: str, side: str) -> Callable[[int], None]:
        streams, jobs = modes[mode]
        each, used = got.setdefault((mode, side), []), cpu.setdefault(f"{side}, {mode}", {})

        def one(_: int) -> None:
            calls, answers = [sides[side]] * streams, list[Answer]()
            spent = cpu_ms(groups, lambda: answers.extend(parallel(calls, jobs)[1]))
            each.append(_figures(env, answers, split=side == "gateway"))
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
                limit = _TARGET_MS[mode]
                row.target, row.met = f"difference <= {limit:g} ms", mine - base <= limit
            rows.append(row)
        for key in (f"{name} p50" for name in _SPLIT):
            mine = median([rep[key] for rep in got[mode, "gateway"]])
            rows.append(Row(f"{mode}: gateway TTFT, {key} (ms)", "-", fmt(mine)))
        for i in range(cfg.reps):
            figures = {f"{side} {k} ms": v for side in urls for k, v in got[mode, side][i].items()}
            reps.append({"rep": i + 1, "mode": mode} | figures)
    title = f"Gateway ({pool}, {STREAMS} worker threads, {cfg.gateway_rate:g} tokens/s)"
    sides_named = ("direct to the simulator", "through avocado-infer")
    note = f"CPU per answer (ms), user + system, by process:\n\n{cpu_table(cpu)}"
    return Outcome("gateway", title, *sides_named, rows, reps, [note], extra | {"cpu": cpu})
