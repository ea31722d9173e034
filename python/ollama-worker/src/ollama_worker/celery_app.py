"""The worker's Celery app, made by ``create_app`` from the settings it is given (or the
environment's, read then): the shared configuration, the fleet's tasks, and everything wired
into Celery's worker: the consumer, the bootstep that holds the worker's resources, the one
that starts a warm shutdown at once and the one that sets up delayed delivery. What each
override of Celery's internals changes is listed in ``ollama_worker.overrides``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

from avocado_shared.celery_config import make_celery
from avocado_shared.topology import ANNOUNCE_TASK
from ollama_worker import announce, tasks
from ollama_worker.lifecycle import Lifecycle
from ollama_worker.overrides.consumer import DeadLetteringConsumer
from ollama_worker.overrides.delayed_delivery import DelayedDelivery
from ollama_worker.overrides.prompt_shutdown import PromptShutdown
from ollama_worker.serving import FollowModels
from ollama_worker.settings import WorkerSettings

if TYPE_CHECKING:
    from ollama_worker.resources import Resources

__all__ = ["WorkerApp", "create_app"]


class WorkerApp(Celery):  # type: ignore[misc]
    """A worker's Celery app: its settings, and once the worker runs, its resources."""

    settings: WorkerSettings
    resources: Resources | None = None


def create_app(settings: WorkerSettings | None = None) -> WorkerApp:
    """A worker app; nothing connects until a worker or beat runs it."""
    settings = settings or WorkerSettings()
    app: WorkerApp = make_celery("ollama_worker", settings, app_class=WorkerApp)
    app.settings = settings
    # Beat (celery -A ollama_worker beat) re-announces the live endpoints through infra.announce.
    app.conf.beat_schedule = {
        "announce-endpoints": {
            "task": ANNOUNCE_TASK,
            "schedule": settings.announce_interval_s,
            "options": {"expires": settings.announce_interval_s},
        }
    }
    app.conf.worker_pool = settings.worker_pool
    # Poison messages go to ml.dlx with their reason instead of being dropped or crashing.
    app.conf.worker_consumer = _path(DeadLetteringConsumer)
    tasks.register(app)
    announce.register(app)
    app.steps["worker"].add(Lifecycle)
    app.steps["consumer"].add(PromptShutdown)
    app.steps["consumer"].add(FollowModels)
    # The consumer has no delayed-delivery step of Celery's: this one, declaring on the live
    # broker only; none for a broker user that may not declare (the admin declared it all).
    if settings.declare_topology:
        app.steps["consumer"].add(DelayedDelivery)
    return app


def _path(cls: type) -> str:
    """Where Celery finds ``cls`` by name (its settings hold names, not classes)."""
    return f"{cls.__module__}:{cls.__qualname__}"
