"""Spicy Avocado's Ollama worker: ``celery -A ollama_worker worker`` runs it.

The Celery app is loaded on first access, so ``ollama_worker.testing`` and the simulator
start without Celery or the worker's settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ollama_worker.celery_app import app, settings

__all__ = ["app", "settings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ollama_worker import celery_app

        return getattr(celery_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
