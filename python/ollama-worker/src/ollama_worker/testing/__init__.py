"""Test helpers shipped with the worker: fakes for the services it talks to.

`OllamaSimulator` stands in for an Ollama server, and for an OpenAI-compatible one
under ``/v1`` (no GPU, no internet), for our tests, our benchmarks and for users
testing their own producers. `fake_ngrok_path()` is a fake ngrok agent to hand to
pyngrok, so tunnels work with no ngrok account.
"""

from __future__ import annotations

from ollama_worker.testing.fake_ngrok import fake_ngrok_path
from ollama_worker.testing.ollama_sim import (
    OllamaSimulator,
    RecordedRequest,
    RequestLog,
    SimConfig,
)

__all__ = ["OllamaSimulator", "RecordedRequest", "RequestLog", "SimConfig", "fake_ngrok_path"]
