"""The worker's Celery app: the shared configuration plus the tasks that call Ollama."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import WorkerShutdown
from celery.signals import worker_init
from kombu.exceptions import OperationalError

from avocado_shared.celery_config import make_celery
from avocado_shared.tls import CertificateError, refuse_untrusted
from avocado_shared.topology import ANNOUNCE_TASK, declare_topology
from ollama_worker.settings import WorkerSettings

__all__ = ["app", "settings"]

logger = logging.getLogger(__name__)

settings = WorkerSettings()
app = make_celery("ollama_worker", settings)
app.conf.include = [
    "ollama_worker.tasks",
    "ollama_worker.announce",
    "ollama_worker.node",
    "ollama_worker.metrics",
]
# Beat (celery -A ollama_worker beat) re-announces the live endpoints through infra.announce.
app.conf.beat_schedule = {
    "announce-endpoints": {
        "task": ANNOUNCE_TASK,
        "schedule": settings.announce_interval_s,
        "options": {"expires": settings.announce_interval_s},
    }
}
app.conf.worker_pool = settings.worker_pool
# Poison messages go to ml.dlx with their reason instead of being dropped or crashing the worker.
app.conf.worker_consumer = "ollama_worker.deadletter:DeadLetteringConsumer"
if not settings.declare_topology:
    app.conf.worker_consumer = "ollama_worker.deadletter:UndeclaringConsumer"


@worker_init.connect
def _connect(**_: Any) -> None:
    """Exit at once when the broker's certificate does not verify, rather than retry forever;
    then declare the dead-letter queue and exchanges too, which the worker does not consume
    (a least-privilege worker finds them declared by ``avocado admin create-worker``)."""
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=10, errback=refuse_untrusted)
        except OperationalError as error:
            if isinstance(error.__cause__, CertificateError):
                logger.critical("worker not started: %s", error.__cause__)
                raise WorkerShutdown(1) from error
            raise
        if settings.declare_topology:
            declare_topology(connection, settings)
            logger.info("topology declared on %s", connection.as_uri())
