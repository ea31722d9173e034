"""Spicy Avocado's Ollama worker: ``celery -A ollama_worker worker`` runs it."""

from __future__ import annotations

from ollama_worker.app import app, settings

__all__ = ["app", "settings"]
