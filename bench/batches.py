"""The batch scenario (issue 26): a batch of many lines through the gateway's Batch API
(``/v1/files`` + ``/v1/batches``, its feeder filling the batch lane a window at a time)
against the fleet's plain saturation on the same worker (``Producer.generate`` for every line
at once, then every result), and the memory of the gateway and the worker while the batch
runs: flat, whatever the batch's size."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import openai
import psutil

from bench.report import Outcome, Row, fmt, median, span
from bench.scenarios import Config, alternate, burst, fleet
from bench.services import MODEL, BenchEnv, process_tree

__all__ = ["batches"]

_TARGET = 0.95  # issue 26: the batch's lines/s against plain saturation's jobs/s


def _write(path: Path, lines: int, rep: int) -> None:
    """The batch's file, written a line at a time."""
    with path.open("w") as out:
        for i in range(lines):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"batch {rep} {i}"}]}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps(line | {"body": body}) + "\n")


class _Peaks:
    """The highest RSS (MB) of each group of processes, sampled every half second."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.groups = groups
        self.start = self._now()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _now(self) -> dict[str, float]:
        return {
            name: sum(p.memory_info().rss for p in procs) / 2**20
            for name, procs in self.groups.items()
        }

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for name, mb in self._now().items():
                self.peak[name] = max(self.peak[name], mb)

    def __enter__(self) -> _Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def batches(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """A simulator of ``cfg.concurrency`` slots and ``cfg.batch_latency_ms`` a generation, one
    worker of that concurrency, a gateway whose feeder fills the batch lane."""
    sim = env.start_sim(parallel=cfg.concurrency, latency_ms=cfg.batch_latency_ms)
    worker = env.start_worker(pool, cfg.concurrency, sim.url)
    results = str(env.tmp / "results.sqlite3")  # the worker's: the feeder reads the rows
    gateway, secret = env.start_gateway(
        AVOCADO_SQLITE_PATH=results, AVOCADO_INFER_FILES_DIR=str(env.tmp / "files")
    )
    sdk = env.closing(
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0, timeout=300)
    )
    groups = {"gateway": [psutil.Process(gateway.pid)], "worker": process_tree(worker)}
    lines, submit = cfg.batch_lines, fleet(env.producer)
    burst(submit, cfg.concurrency * 2)  # warm: connections, the worker's threads
    plain, batch, memory = list[float](), list[float](), list[dict[str, Any]]()

    def saturated(_: int) -> None:
        rate = lines / burst(submit, lines)
        plain.append(rate)
        cfg.log(f"  plain saturation: {rate:.1f} jobs/s")

    def batched(rep: int) -> None:
        path = env.tmp / f"batch-{rep}.jsonl"
        _write(path, lines, rep)
        with path.open("rb") as handle:
            uploaded = sdk.files.create(file=handle, purpose="batch")
        with _Peaks(groups) as peaks:
            start = time.perf_counter()
            made = sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while (found := sdk.batches.retrieve(made.id)).status not in ("completed", "failed"):
                time.sleep(0.2)
            seconds = time.perf_counter() - start
        if found.status != "completed" or found.request_counts is None:
            raise RuntimeError(f"batch {made.id} {found.status}: {found.errors}")
        if found.request_counts.completed != lines:
            raise RuntimeError(f"batch {made.id}: {found.request_counts}")
        batch.append(lines / seconds)
        memory.append({"start": peaks.start, "peak": peaks.peak})
        cfg.log(f"  batch: {lines / seconds:.1f} lines/s, RSS {peaks.start} -> {peaks.peak}")

    alternate(cfg.batch_reps, saturated, batched)
    ratio = median(batch) / median(plain)
    rows = [
        Row(
            f"throughput, {lines} lines (jobs/s)",
            span(plain, 1),
            span(batch, 1),
            f"x{fmt(ratio, 3)}",
            f"ratio >= {_TARGET:g}",
            ratio >= _TARGET,
        )
    ]
    for name in groups:
        start = median([m["start"][name] for m in memory])
        peak = median([m["peak"][name] for m in memory])
        rows.append(
            Row(
                f"{name} RSS during the batch (MB)",
                fmt(start, 0),
                fmt(peak, 0),
                f"{peak - start:+.0f} MB",
            )
        )
    reps = [
        {"rep": i + 1, "plain jobs/s": a, "batch lines/s": b}
        for i, (a, b) in enumerate(zip(plain, batch, strict=True))
    ]
    title = (
        f"Batch of {lines} lines ({pool}, concurrency {cfg.concurrency}, "
        f"{cfg.batch_latency_ms:g} ms a generation)"
    )
    sides = ("plain saturation (Producer.generate)", "a batch through /v1/batches")
    notes = ["RSS rows: baseline column at the batch's start, fleet column its highest during it."]
    extra = {"pool": pool, "plain": median(plain), "batch": median(batch), "ratio": ratio}
    return Outcome("batch", title, *sides, rows, reps, notes, extra)
