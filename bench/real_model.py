"""Scenarios 1 and 2 again on a real model (issue 12): SmolLM2-135M on llama-cpp-python's
OpenAI-compatible server, the embedded default, against the same server called directly."""

from __future__ import annotations

import time
from functools import partial

from avocado_shared import Producer
from bench.report import Outcome, Row, fmt, median, percentile
from bench.scenarios import Config, alternate, parallel
from bench.services import BenchEnv
from ollama_worker.embedded import MODEL
from ollama_worker.openai_backend import OpenAIClient

__all__ = ["N_CTX", "TOKENS", "real_overhead", "real_saturation"]

N_CTX = 1024
TOKENS = 32
"""Tokens per answer: short enough for repetitions, long enough to be a real generation."""
_OPTIONS = {"num_predict": TOKENS, "temperature": 0, "seed": 7}
_WAIT_S = 600.0
_TOKENS = "tokens/s (completion tokens over wall time)"


def _prompt(index: int) -> str:
    return f"In one sentence, what is the number {index} known for?"


def _start(env: BenchEnv, cfg: Config, pool: str) -> str:
    """The embedded model's server and a worker on it; the server's URL."""
    url = env.start_embedded(N_CTX).url
    backend = {"AVOCADO_BACKEND": "openai", "AVOCADO_BACKEND_URL": url}
    env.start_worker(pool, cfg.concurrency, variables=backend | {"AVOCADO_DEFAULT_MODEL": MODEL})
    return url


def _fleet(producer: Producer, index: int) -> int:
    """One job through the fleet; its completion tokens."""
    handle = producer.generate(_prompt(index), model=MODEL, options=_OPTIONS)
    return int(handle.get(timeout=_WAIT_S).completion_tokens)


def _direct(client: OpenAIClient, index: int) -> int:
    return client.generate(MODEL, _prompt(index), options=_OPTIONS).usage.completion_tokens


def _compared(metric: str, base: list[float], mine: list[float], digits: int) -> Row:
    ratio = f"x{fmt(median(mine) / median(base), 3)}"
    return Row(metric, fmt(median(base), digits), fmt(median(mine), digits), ratio)


def real_overhead(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Sequential real generations, each prompt once per side: latency and tokens/s."""
    client = env.closing(OpenAIClient(_start(env, cfg, pool)))
    calls = {"direct": partial(_direct, client), "fleet": partial(_fleet, env.producer)}
    for call in calls.values():  # warm: each side once
        call(-1)
    reps = []
    for rep in range(cfg.reps):
        runs: dict[str, list[tuple[float, int]]] = {"direct": [], "fleet": []}
        for i in range(cfg.real_jobs):
            for name in ("fleet", "direct") if (rep + i) % 2 == 0 else ("direct", "fleet"):
                # The server reuses the longest prefix it still holds: the same short request
                # before each timed one leaves it in the same state for both sides.
                client.generate(MODEL, "Hello.", options={"num_predict": 1})
                start = time.perf_counter()
                tokens = calls[name](rep * cfg.real_jobs + i)
                runs[name].append((time.perf_counter() - start, tokens))
        row: dict[str, float] = {"rep": rep + 1}
        row |= {f"{n} p50 ms": percentile([s * 1000.0 for s, _ in runs[n]], 50) for n in runs}
        rate = {n: sum(t for _, t in r) / sum(s for s, _ in r) for n, r in runs.items()}
        row |= {f"{n} tokens/s": v for n, v in rate.items()}
        # Greedy: a prompt gets the same answer on both sides, so its generation cancels out.
        pairs = zip(runs["fleet"], runs["direct"], strict=True)
        row["per-prompt difference ms"] = median([(f - d) * 1000.0 for (f, _), (d, _) in pairs])
        reps.append(row)
    column = {k: [r[k] for r in reps] for k in reps[0]}
    base, mine = median(column["direct p50 ms"]), median(column["fleet p50 ms"])
    added = median(column["per-prompt difference ms"])
    each = Row("added per job: median of per-prompt differences (ms)", "-", "-")
    each.compared = f"{added:+.2f} ms ({added / base:+.1%} of an answer)"
    each.target, each.met = "difference <= 3 ms", added <= 3.0
    rows = [Row("p50 latency (ms)", fmt(base), fmt(mine), f"{mine - base:+.2f} ms"), each]
    rows.append(_compared(_TOKENS, column["direct tokens/s"], column["fleet tokens/s"], 1))
    title = f"1r. Overhead on the real model ({pool}, concurrency {cfg.concurrency})"
    extra = {"pool": pool, "direct p50": base, "fleet p50": mine, "added": added}
    return Outcome("1r", title, "direct httpx", f"fleet ({pool})", rows, reps, extra=extra)


def real_saturation(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """A burst of real generations: can the fleet keep the server as busy as 4 clients do?"""
    url, producer, jobs = _start(env, cfg, pool), env.producer, cfg.real_burst
    clients = [env.closing(OpenAIClient(url)) for _ in range(4)]

    def fleet_burst() -> tuple[float, list[int]]:
        start = time.perf_counter()
        send = partial(producer.generate, model=MODEL, options=_OPTIONS)
        handles = [send(_prompt(i)) for i in range(jobs)]
        tokens = [h.get(timeout=_WAIT_S).completion_tokens for h in handles]
        return time.perf_counter() - start, tokens

    direct = [partial(_direct, c) for c in clients]
    found = {f"{n} {u}": list[float]() for u in ("jobs/s", "tokens/s") for n in ("direct", "fleet")}

    def measure(name: str) -> None:
        elapsed, tokens = parallel(direct, jobs) if name == "direct" else fleet_burst()
        found[f"{name} jobs/s"].append(jobs / elapsed)
        found[f"{name} tokens/s"].append(sum(tokens) / elapsed)

    _fleet(producer, -1)
    alternate(cfg.reps, lambda _: measure("fleet"), lambda _: measure("direct"))
    rows = [
        _compared("throughput (jobs/s)", found["direct jobs/s"], found["fleet jobs/s"], 3),
        _compared(_TOKENS, found["direct tokens/s"], found["fleet tokens/s"], 1),
    ]
    ratio = median(found["fleet jobs/s"]) / median(found["direct jobs/s"])
    rows[0].target, rows[0].met = "ratio >= 0.95", ratio >= 0.95
    reps = [{"rep": i + 1} | {k: v[i] for k, v in found.items()} for i in range(cfg.reps)]
    title = f"2r. Saturation on the real model ({pool}, concurrency {cfg.concurrency})"
    sides_named = ("direct httpx, 4 clients", f"fleet ({pool})")
    return Outcome("2r", title, *sides_named, rows, reps, extra={"pool": pool, "ratio": ratio})
