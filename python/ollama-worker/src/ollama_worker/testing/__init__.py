"""Test helpers shipped with the worker: fakes for the services it talks to.

`OllamaSimulator` stands in for an Ollama server (no GPU, no internet), for our
tests, our benchmarks and for users testing their own producers.
"""

from __future__ import annotations

from ollama_worker.testing.ollama_sim import (
    OllamaSimulator,
    RecordedRequest,
    RequestLog,
    SimConfig,
)

__all__ = ["OllamaSimulator", "RecordedRequest", "RequestLog", "SimConfig"]
