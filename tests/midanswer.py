"""An answer slow enough to be caught in its middle (its worker killed, its client gone), the
same simulated model at full speed for the answer it must end up as, and what a test reads
from a continued answer."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.ollama import OllamaClient

__all__ = ["ASK", "MODEL", "TOKENS", "continued_from", "longest_gap", "reference", "slow"]

MODEL = "llama3.2:1b"
TOKENS = 30
ASK = "Tell me about avocados."


def slow() -> OllamaSimulator:
    """A simulator streaming 10 tokens a second: a ``TOKENS`` answer takes 3 s."""
    return OllamaSimulator(SimConfig(models=[MODEL], default_tokens=TOKENS, tokens_per_s=10))


@contextmanager
def reference() -> Iterator[OllamaClient]:
    """The same simulated model at full speed: its answers are the ones a job must end up
    with, however often it was interrupted."""
    with (
        OllamaSimulator(SimConfig(models=[MODEL], default_tokens=TOKENS)) as sim,
        OllamaClient(sim.url) as client,
    ):
        yield client


def continued_from(sim: OllamaSimulator, path: str) -> str:
    """The text the last request to ``path`` asked ``sim`` to continue (its trailing
    assistant message)."""
    last = sim.requests.last(path).body["messages"][-1]
    assert last["role"] == "assistant", last
    return str(last["content"])


def longest_gap(times: Sequence[float]) -> float:
    """The longest time between two consecutive moments of ``times``."""
    return max(b - a for a, b in itertools.pairwise(times))
