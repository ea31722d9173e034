"""Scenario 9 (issue 24): 16 streams at once on a server that runs 4 at once, through the
gateway of a fleet started with the defaults, against the same clients straight to the
server and through LiteLLM's proxy, the usual way to put one API in front of a server.

LiteLLM is not the project's dependency: the scenario installs it into a virtualenv of its
own (``.venv-litellm``, or ``BENCH_LITELLM_VENV``) on first use, from PyPI.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench.report import Outcome, Row, fmt, median, percentile
from bench.scenarios import Config, alternate, parallel
from bench.services import MODEL, REPO, BenchEnv
from tests import processes as procs

__all__ = ["LITELLM", "sixteen_streams"]

LITELLM = "litellm[proxy]==1.108.7"
STREAMS = 16
SLOTS = 4
_PROXIES = ("litellm", "gateway")
_VENV = Path(os.environ.get("BENCH_LITELLM_VENV", REPO / ".venv-litellm"))


def _litellm() -> Path:
    """LiteLLM's proxy command, installed into its own virtualenv the first time."""
    command = _VENV / "bin" / "litellm"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(_VENV)], check=True)
        pip = [str(_VENV / "bin" / "pip"), "install", "--quiet", LITELLM]
        subprocess.run(pip, check=True)
    return command


def _start_litellm(env: BenchEnv, sim_url: str, master_key: str) -> procs.Server:
    """LiteLLM's proxy on a port of its own, serving MODEL from the simulator's /v1, asking
    for ``master_key`` as the gateway asks for its key (it refuses to start without one)."""
    port = procs.free_port()
    config = env.tmp / "litellm.yaml"
    entry = {
        "model_name": MODEL,
        "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{sim_url}/v1", "api_key": "-"},
    }
    config.write_text(json.dumps({"model_list": [entry]}))  # YAML reads JSON
    args = [str(_litellm()), "--config", str(config), "--port", str(port), "--num_workers", "1"]
    log = env.tmp / "litellm.log"
    quiet = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_MASTER_KEY": master_key,
    }
    server = env.started(
        procs.Server(
            procs.spawn(args, log, env=quiet, cwd=env.tmp), log, f"http://127.0.0.1:{port}"
        )
    )

    def ready() -> bool:
        server.check_running("litellm")
        try:
            return httpx.get(f"{server.url}/health/liveliness", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    procs.wait_for(ready, 180, "LiteLLM's proxy to answer")
    return server


def _times(client: httpx.Client, url: str, i: int) -> tuple[float, float]:
    """Milliseconds to the first piece of text of a streamed ``/v1/chat/completions``, and to
    its end."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"bench streams {i % 64}"}],
        "stream": True,
    }
    start = time.perf_counter()
    first = 0.0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if not first and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter()
    if not first:
        raise RuntimeError(f"{url}: an answer without text")
    return 1000.0 * (first - start), 1000.0 * (time.perf_counter() - start)


def sixteen_streams(env: BenchEnv, cfg: Config, pool: str) -> Outcome:
    """16 client threads on each path, the same prompts; TTFT p50 and p99 per repetition."""
    sim = env.start_sim(parallel=SLOTS, tokens_per_s=cfg.gateway_rate)
    env.start_worker(pool=pool, concurrency=None, ollama_url=sim.url)  # the defaults
    gateway, secret = env.start_gateway()
    master_key = "sk-" + secrets.token_hex(16)
    proxy = _start_litellm(env, sim.url, master_key)
    limits = httpx.Limits(max_connections=64)

    def client(key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        made: httpx.Client = env.closing(httpx.Client(timeout=300, limits=limits, headers=headers))
        return made

    paths = {
        "direct": partial(_times, client(None), sim.url),
        "gateway": partial(_times, client(secret), gateway.url),
        "litellm": partial(_times, client(master_key), proxy.url),
    }
    for call in paths.values():  # warm: connections, the worker's threads, LiteLLM's router
        parallel([call] * STREAMS, 2 * STREAMS)
    got: dict[str, list[tuple[float, float]]] = {side: [] for side in paths}
    alone: dict[str, list[tuple[float, float]]] = {side: [] for side in paths}

    def run(side: str) -> Any:
        def one(_: int) -> None:
            ttfts = [t for t, _ in parallel([paths[side]] * STREAMS, cfg.streams_jobs)[1]]
            got[side].append((percentile(ttfts, 50), percentile(ttfts, 99)))
            each = [paths[side](i) for i in range(cfg.gateway_jobs)]  # one at a time
            alone[side].append(tuple(percentile([e[k] for e in each], 50) for k in (0, 1)))

        return one

    alternate(cfg.reps, *(run(side) for side in paths))
    p50 = {side: median([r[0] for r in reps]) for side, reps in got.items()}
    p99 = {side: median([r[1] for r in reps]) for side, reps in got.items()}
    rows = [
        Row("TTFT p50 (ms), straight to the server", "", fmt(p50["direct"], 0)),
        Row(
            "TTFT p50 (ms), through LiteLLM's proxy",
            fmt(p50["direct"], 0),
            fmt(p50["litellm"], 0),
            f"x{fmt(p50['litellm'] / p50['direct'])}",
        ),
        Row(
            "TTFT p50 (ms), through avocado-infer and the fleet (defaults)",
            fmt(p50["direct"], 0),
            fmt(p50["gateway"], 0),
            f"x{fmt(p50['gateway'] / p50['direct'])}; x{fmt(p50['gateway'] / p50['litellm'])} "
            "of LiteLLM's",
        ),
        Row(
            "TTFT p99 (ms): direct / LiteLLM / avocado-infer",
            "",
            " / ".join(fmt(p99[side], 0) for side in ("direct", "litellm", "gateway")),
        ),
    ]
    note = (
        f"A simulator that runs {SLOTS} answers at once (`--parallel {SLOTS}`, "
        f"{cfg.gateway_rate:g} tokens/s, 24 tokens); {STREAMS} client threads send "
        f"{cfg.streams_jobs} streamed `/v1/chat/completions` per repetition on each path: "
        "straight to the simulator's OpenAI API, through LiteLLM's proxy "
        f"(`{LITELLM}`, one worker, `openai/` provider on the simulator's /v1), and through "
        "`avocado-infer` to a worker started with the defaults (`celery -A ollama_worker "
        "worker`, no `--concurrency`: it runs as many jobs as its server, 4). "
        f"{cfg.reps} repetitions, rotating which path goes first; medians of each "
        "repetition's percentiles. Answers queue at the server on every path: 16 streams on "
        "4 slots."
    )
    rows += _one_at_a_time(alone)
    note += (
        f" Then, in the same repetition, {cfg.gateway_jobs} requests one at a time on the same "
        "path: what each proxy adds to the first token and to the whole answer (issue 28: stay "
        "ahead of LiteLLM's)."
    )
    title = f"9. Sixteen streams on a server of {SLOTS} slots ({pool}, defaults)"
    return Outcome("9", title, "straight to the server", "through the path", rows, [], [note])


def _one_at_a_time(alone: dict[str, list[tuple[float, float]]]) -> list[Row]:
    """Time added to the first token and to the whole answer, p50, by each proxy; the
    gateway's against LiteLLM's."""
    rows = []
    for k, what in enumerate(("TTFT", "total")):
        base = median([r[k] for r in alone["direct"]])
        added = {side: median([r[k] for r in alone[side]]) - base for side in _PROXIES}
        row = Row(
            f"one at a time: {what} p50 added (ms), LiteLLM's proxy / avocado-infer",
            fmt(base),
            f"{added['litellm']:+.2f} / {added['gateway']:+.2f}",
            f"{added['litellm'] - added['gateway']:+.2f} ms ahead of LiteLLM's",
        )
        row.target, row.met = "less added than LiteLLM's", added["gateway"] < added["litellm"]
        rows.append(row)
    return rows
