"""An Ollama server without a GPU or the internet: the fleet's ``--simulate`` and a fake to
test producers against.

`OllamaSimulator` answers Ollama's ``/api`` and, under ``/v1``, an OpenAI-compatible
server's routes, with deterministic text, so our tests, our benchmarks and users testing
their own producers meet the wire format of production.
"""

from __future__ import annotations

from avocado_sim.simulator import OllamaSimulator, Outcome, RecordedRequest, RequestLog, SimConfig

__all__ = ["OllamaSimulator", "Outcome", "RecordedRequest", "RequestLog", "SimConfig"]
