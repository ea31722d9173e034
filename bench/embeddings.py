"""The embeddings scenario (issue 25): texts per second through the fleet (``Producer.embed``,
a durable job on the embedding model's queue) against the worker's own ``OllamaClient``
straight to the simulator's ``/api/embed``: a batch of many texts in one request (one job),
and one text a request (a job each), sequentially."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.report import Outcome, Row, fmt, median, span
from bench.scenarios import Config, alternate
from bench.services import MODEL, BenchEnv
from ollama_worker.ollama import OllamaClient

__all__ = ["EMBEDDING", "embeddings"]

EMBEDDING = "all-minilm"
_GET_TIMEOUT_S = 300.0


def _texts(count: int, rep: int) -> list[str]:
    """``count`` different texts of about a dozen words (the simulator's tokens)."""
    return [
        f"bench embedding {rep} {i}: a short sentence about avocados and queues"
        for i in range(count)
    ]


def embeddings(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """One worker of ``cfg.concurrency`` on a simulator serving a chat model and the embedding
    model (it takes the jobs of both); its batch size is the batch's, so a batched job is one
    request to the simulator, as the direct side's."""
    sim = env.start_sim(models=(MODEL, EMBEDDING))
    batch = str(cfg.embed_batch)
    variables = {"AVOCADO_EMBED_BATCH_SIZE": batch}
    env.start_worker(pool, cfg.concurrency, sim.url, variables=variables)
    client = env.closing(OllamaClient(sim.url))
    producer = env.producer

    def direct(texts: list[str]) -> int:
        return len(client.embed(EMBEDDING, texts).vectors)

    def fleet(texts: list[str]) -> int:
        return len(producer.embed(texts, model=EMBEDDING).get(timeout=_GET_TIMEOUT_S).embeddings)

    sides: dict[str, Callable[[list[str]], int]] = {"direct": direct, "fleet": fleet}
    modes = {"batched": (cfg.embed_batch, 1), "one by one": (1, cfg.embed_single)}
    for side in sides.values():  # warm: connections, the worker's threads, the model's queue
        for size, count in modes.values():
            for _ in range(count):
                side(_texts(size, -1))
    got: dict[tuple[str, str], list[float]] = {}

    def run(mode: str, side: str) -> Callable[[int], None]:
        size, count = modes[mode]

        def one(rep: int) -> None:
            start = time.perf_counter()
            done = sum(sides[side](_texts(size, rep * count + k)) for k in range(count))
            rate = done / (time.perf_counter() - start)
            got.setdefault((mode, side), []).append(rate)
            cfg.log(f"  {mode}, {side}: {rate:.0f} texts/s")

        return one

    for mode in modes:
        alternate(cfg.reps, run(mode, "direct"), run(mode, "fleet"))
    rows, reps, extra = list[Row](), list[dict[str, Any]](), dict[str, Any](pool=pool)
    for mode, (size, count) in modes.items():
        base, mine = got[mode, "direct"], got[mode, "fleet"]
        ratio = median(mine) / median(base)
        what = f"{size} texts in one request" if count == 1 else f"{count} texts, one a request"
        rows.append(
            Row(f"{mode} ({what}): texts/s", span(base, 0), span(mine, 0), f"x{fmt(ratio, 3)}")
        )
        extra |= {f"{mode} direct": median(base), f"{mode} fleet": median(mine)}
        reps += [
            {"rep": i + 1, "mode": mode, "direct texts/s": a, "fleet texts/s": b}
            for i, (a, b) in enumerate(zip(base, mine, strict=True))
        ]
    title = f"Embeddings ({pool}, concurrency {cfg.concurrency})"
    sides_named = ("direct to the simulator", "through the fleet")
    return Outcome("embed", title, *sides_named, rows, reps, [], extra)
