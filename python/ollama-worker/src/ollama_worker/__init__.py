"""Spicy Avocado's Ollama worker: ``celery -A ollama_worker worker`` runs it.

``ollama_worker.app`` is made on first access from the environment's settings
(``celery_app.create_app``); importing the package makes nothing, so its commands
(``avocado-worker``, ``avocado-embedded-llm``) start without the Celery app or its settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ollama_worker.celery_app import WorkerApp

    app: WorkerApp

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from ollama_worker.overrides.httpx_cli import leave_out

        leave_out()  # before the app's modules import httpx
        from ollama_worker.celery_app import create_app

        made = globals()["app"] = create_app()
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
