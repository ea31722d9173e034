"""``avocado-infer``: the gateway under uvicorn, on the host and port of its settings."""

from __future__ import annotations

import uvicorn

from avocado_infer.app import create_app
from avocado_infer.settings import InferSettings
from avocado_shared.tracing import setup_tracing

__all__ = ["main"]


def main() -> None:
    """Serve until interrupted."""
    settings = InferSettings()
    setup_tracing("avocado-infer")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level
    )
