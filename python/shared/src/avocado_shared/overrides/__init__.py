"""The fleet's overrides of Celery, kombu, py-amqp and celery-singleton internals that a
producer needs as much as a worker: each one, with what it changes, why, the version it was
written against and the test that pins it, is in the index of ``ollama_worker.overrides``,
the one list to check on an upgrade."""

from __future__ import annotations

__all__: list[str] = []
