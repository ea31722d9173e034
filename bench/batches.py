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

import openai
import psutil

from bench.report import Outcome, Row, fmt, median, span
from bench.scenarios import Config, alternate, burst, fleet
from bench.services import MODEL, BenchEnv, process_tree

__all__ = ["batches"]

_TARGET = 0.95  # issue 26: the batch's lines/s against plain saturation's jobs/s
# Issue 26: memory flat whatever the batch's size: a batch after the first grows a process's
# RSS by no more than this.
_FLAT_MB = 1.0


def _write(path: Path, lines: int, rep: int) -> None:
    """The batch's file, written a line at a time."""
    with path.open("w") as out:
        for i in range(lines):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"batch {rep} {i}"}]}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps(line | {"body": body}) + "\n")


class _Peaks:
    """The highest RSS (MB) of each group of processes, sampled every half second and at the
    end."""

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
            self._sample()

    def _sample(self) -> None:
        for name, mb in self._now().items():
            self.peak[name] = max(self.peak[name], mb)

    def __enter__(self) -> _Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the end too: writing the output files can fall between two samples


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
    plain, batch, peaks = list[float](), list[float](), list[_Peaks]()

    def saturated(_: int) -> None:
        rate = lines / burst(submit, lines)
        plain.append(rate)
        cfg.log(f"  plain saturation: {rate:.1f} jobs/s")

    def batched(rep: int) -> None:
        path = env.tmp / f"batch-{rep}.jsonl"
        _write(path, lines, rep)
        with path.open("rb") as handle:
            uploaded = sdk.files.create(file=handle, purpose="batch")
        with _Peaks(groups) as found:
            start = time.perf_counter()
            made = sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while (done := sdk.batches.retrieve(made.id)).status not in ("completed", "failed"):
                time.sleep(0.2)
            seconds = time.perf_counter() - start
        if done.status != "completed" or done.request_counts is None:
            raise RuntimeError(f"batch {made.id} {done.status}: {done.errors}")
        if done.request_counts.completed != lines:
            raise RuntimeError(f"batch {made.id}: {done.request_counts}")
        batch.append(lines / seconds)
        peaks.append(found)
        cfg.log(f"  batch: {lines / seconds:.1f} lines/s, RSS {found.start} -> {found.peak}")

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
    first, last = peaks[0], peaks[-1]
    for name in groups:
        growth = last.peak[name] - last.start[name]
        rows.append(
            Row(
                f"{name} RSS during a batch, at its start -> highest (MB)",
                f"{first.start[name]:.1f} -> {first.peak[name]:.1f}",
                f"{last.start[name]:.1f} -> {last.peak[name]:.1f}",
                f"{growth:+.1f} MB",
                f"growth <= {_FLAT_MB:g} MB",
                growth <= _FLAT_MB,
            )
        )
    reps = [
        {"rep": i + 1, "plain jobs/s": a, "batch lines/s": b}
        | {f"{name} RSS MB": f"{p.start[name]:.1f} -> {p.peak[name]:.1f}" for name in groups}
        for i, (a, b, p) in enumerate(zip(plain, batch, peaks, strict=True))
    ]
    title = (
        f"Batch of {lines} lines ({pool}, concurrency {cfg.concurrency}, "
        f"{cfg.batch_latency_ms:g} ms a generation)"
    )
    sides = ("plain saturation (Producer.generate)", "a batch through /v1/batches")
    notes = [
        "RSS rows: the first batch in the baseline column, the last in the fleet column; the "
        "growth and its target are the last batch's: what a process keeps for each line "
        "would show in every batch, what it fills once (a cache, its first use) in the first."
    ]
    extra = {"pool": pool, "plain": median(plain), "batch": median(batch), "ratio": ratio}
    return Outcome("batch", title, *sides, rows, reps, notes, extra)
