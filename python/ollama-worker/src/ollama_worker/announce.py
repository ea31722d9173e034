"""The beat job on ``infra.announce``: whichever worker takes it re-publishes every live
endpoint, so consumers that started late catch up, and announces the removal of nodes
whose record expired (a worker SIGKILLed, a notebook gone)."""

from __future__ import annotations

import logging
import threading

from avocado_shared.discovery import EndpointEvent, publish_announcement
from avocado_shared.registry import NodeRegistry
from avocado_shared.topology import ANNOUNCE_TASK
from ollama_worker.celery_app import app, settings

__all__ = ["announce"]

logger = logging.getLogger(__name__)

_registry: NodeRegistry | None = None
_registry_lock = threading.Lock()


def registry() -> NodeRegistry:
    """This process's registry client, made after the pool forked."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = NodeRegistry.from_settings(settings)
        return _registry


@app.task(name=ANNOUNCE_TASK, ignore_result=True)
def announce() -> dict[str, int]:
    """Re-announce the live endpoints and announce the expired ones removed."""
    nodes = registry()
    live = nodes.live()
    gone = nodes.sweep_expired()
    with app.connection_for_write() as connection:
        for endpoint in live:
            publish_announcement(connection, endpoint, EndpointEvent.CHANGED)
        for endpoint in gone:
            publish_announcement(connection, endpoint, EndpointEvent.REMOVED)
            logger.info("%s expired: removal announced for %s", endpoint.service_id, endpoint.url)
    return {"live": len(live), "removed": len(gone)}
