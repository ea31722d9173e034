"""The beat job on ``infra.announce``: whichever worker takes it re-publishes every live
endpoint, so consumers that started late catch up, and announces the removal of nodes
whose record expired (a worker SIGKILLed, a notebook gone)."""

from __future__ import annotations

import logging

from celery import Celery

from avocado_shared.discovery import EndpointEvent, publish_announcement
from avocado_shared.topology import ANNOUNCE_TASK
from ollama_worker.resources import resources_of

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(app: Celery) -> None:
    """Add the announce task to ``app``."""

    @app.task(name=ANNOUNCE_TASK, ignore_result=True, shared=False)
    def announce() -> dict[str, int]:
        """Re-announce the live endpoints and announce the expired ones removed."""
        nodes = resources_of(app).registry()
        live = nodes.live()
        gone = nodes.sweep_expired()
        with app.connection_for_write() as connection:
            for endpoint in live:
                publish_announcement(connection, endpoint, EndpointEvent.CHANGED)
            for endpoint in gone:
                publish_announcement(connection, endpoint, EndpointEvent.REMOVED)
                logger.info(
                    "%s expired: removal announced for %s", endpoint.service_id, endpoint.url
                )
        return {"live": len(live), "removed": len(gone)}
