"""One streamed ``/api/generate`` as the gateway scenarios send it, to the simulator or through
avocado-infer, with its times."""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import httpx

from bench.services import MODEL

__all__ = ["Answer", "streamed"]


class Answer(NamedTuple):
    """One streamed answer: TTFT and total (ms), text, job, when sent and first token (epoch ms)."""

    ttft: float
    total: float
    text: str
    job: str
    sent_at: float
    first_at: float


def streamed(client: httpx.Client, url: str, i: int, texts: dict[int, str]) -> Answer:
    """Job ``i``, a streamed ``/api/generate``; its text must be every side's (``texts``)."""
    prompt = f"bench gateway {i % 64}"
    body = {"model": MODEL, "prompt": prompt}
    start, sent_at, first, first_at = time.perf_counter(), 1000 * time.time(), 0.0, 0.0
    text: list[str] = []
    with client.stream("POST", f"{url}/api/generate", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("response") and not text:
                first, first_at = time.perf_counter(), 1000 * time.time()
            text.append(str(chunk.get("response", "")))
            if chunk.get("done"):
                break
    if not first:
        raise RuntimeError(f"{url}: an answer without text")
    total = 1000.0 * (time.perf_counter() - start)
    job = response.headers.get("x-avocado-job-id", "")
    answer = Answer(1000.0 * (first - start), total, "".join(text), job, sent_at, first_at)
    if texts.setdefault(i % 64, answer.text) != answer.text:
        raise RuntimeError(f"{url} answered {answer.text!r} to {prompt!r}")
    return answer
