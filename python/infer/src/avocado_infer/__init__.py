"""avocado-infer: Ollama's and OpenAI's HTTP APIs in front of the fleet's durable jobs."""

from __future__ import annotations

from avocado_infer.app import create_app
from avocado_infer.settings import InferSettings

__all__ = ["InferSettings", "create_app"]
