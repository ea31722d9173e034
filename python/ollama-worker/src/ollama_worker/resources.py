"""What a running worker holds, made when it starts and closed when it stops.

One object per worker, kept on its app (``resources_of(app)``): the settings, the result
store, the job leases, the token streams, the metrics, the node that announces this host
and, per process, every client: the inference server's, the registry's, the token streams'
Redis and celery-singleton's lock store (made on first use in each process, so a prefork
child never shares its parent's sockets, and closed here). Nothing here is made on import.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery
from celery.exceptions import WorkerShutdown
from celery_singleton.backends import RedisBackend
from kombu.exceptions import OperationalError
from redis import Redis

from avocado_shared.fleet import WorkerRegistry
from avocado_shared.overrides.singleton import close_lock_store, new_lock_store
from avocado_shared.redis_clients import redis_client
from avocado_shared.registry import NodeRegistry
from avocado_shared.store import ResultStore, StoreError
from avocado_shared.tls import CertificateError, refuse_untrusted
from avocado_shared.topology import declare_topology
from ollama_worker.backends import Backend, make_backend
from ollama_worker.leases import Leases
from ollama_worker.metrics import MetricsExporter, MetricsUnavailable
from ollama_worker.retry import RetryPolicy
from ollama_worker.serving import Serving
from ollama_worker.settings import WorkerSettings
from ollama_worker.token_stream import TokenStreams

if TYPE_CHECKING:
    from ollama_worker.node import Node

__all__ = ["Resources", "held_by", "resources_of"]

logger = logging.getLogger(__name__)
_C = TypeVar("_C")


class Resources:
    """A worker's long-lived parts: ``open`` before the pool forks, ``start`` once it runs,
    ``stop`` when shutdown begins (Celery's worker bootstep ``lifecycle.Lifecycle`` calls
    them), ``close`` once the pool has stopped (``worker_shutdown``)."""

    def __init__(self, app: Celery, settings: WorkerSettings) -> None:
        self.app = app
        self.settings = settings
        self.store = ResultStore.from_settings(settings)
        self.leases = Leases(settings.key_prefix, settings.job_lease_s)
        self.retry = RetryPolicy(settings.retry_max, settings.retry_backoff_max_s)
        self.streams = TokenStreams(
            self.redis, settings.key_prefix, settings.stream_ttl_s, settings.stream_resume
        )
        self.present_models: set[str] = set()
        self.metrics: MetricsExporter | None = None
        self.serving = Serving(app, settings, WorkerRegistry.from_settings(settings))
        self.name = settings.worker_id
        self.slots = 1
        self.node: Node | None = None
        self._schema_ready = False
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # name -> (client, how to close it), this process's only
        self._clients: dict[str, tuple[Any, Callable[[Any], None]]] = {}

    def open(self, name: str, slots: int) -> None:
        """Before the pool forks: reach the broker (exit at once when its certificate does
        not verify, rather than retry forever), declare the topology, choose the lane queues
        of the server's models, upgrade the schema, make the metrics (their multiprocess
        directory must exist before the fork). This worker is node ``name`` and its pool
        runs ``slots`` jobs at once."""
        self.name, self.slots = name, slots
        with self.app.connection_for_write() as connection:
            try:
                connection.ensure_connection(max_retries=10, errback=refuse_untrusted)
            except OperationalError as error:
                if isinstance(error.__cause__, CertificateError):
                    logger.critical("worker not started: %s", error.__cause__)
                    raise WorkerShutdown(1) from error
                raise
            # Also the dead-letter queue and exchanges, which the worker does not consume;
            # a least-privilege worker finds them declared by `avocado admin create-worker`.
            if self.settings.declare_topology:
                declare_topology(connection, self.settings)
                logger.info("topology declared on %s", connection.as_uri())
        self.serving.select()
        try:
            self.ensure_schema()
            logger.info("results in %r", self.store)
        except StoreError as error:
            logger.error("results database not ready, will retry on the first job: %s", error)
        if self.settings.metrics_port:
            try:
                self.metrics = MetricsExporter(
                    self.settings.metrics_host,
                    self.settings.metrics_port,
                    multiprocess=self.settings.worker_pool == "prefork",
                )
            except MetricsUnavailable as error:
                logger.warning("metrics disabled: %s", error)

    def ensure_schema(self) -> None:
        """Upgrade ``ml_results`` once per worker (forked children inherit the flag)."""
        if not self._schema_ready:
            self.store.migrate()
            self._schema_ready = True

    def start(self) -> None:
        """The pool runs: serve the metrics, and with a tunnel or a public URL configured,
        this host joins the registry."""
        if self.metrics is not None:
            self.metrics.serve()
        self.serving.start(self.name, self.slots)
        if self.settings.tunnel or self.settings.public_url:
            from ollama_worker.exposure import exposure
            from ollama_worker.node import Node

            registry = NodeRegistry.from_settings(self.settings)  # the node closes it
            # What its server has: a caller of the endpoint may ask for any of them.
            models = lambda: sorted(self.serving.found.values())  # noqa: E731
            self.node = Node(
                self.app, self.settings, exposure(self.settings), registry, models
            ).start()

    def model_name(self, named: str | None) -> str:
        """The model a job names (the default when it names none), as the server names it."""
        return self.serving.server_name(named or self.settings.default_model)

    def stop(self) -> None:
        """Shutdown begins: leave the fleet registry and withdraw the node at once; the jobs
        still running keep the rest."""
        self.serving.stop()
        if self.node is not None:
            self.node.stop()
            self.node = None

    def close(self) -> None:
        """The pool is done (a warm shutdown lets running jobs finish first): stop serving
        metrics, close every client and the store."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.leases.close()
        self.serving.registry.close()
        self.close_clients()
        self.store.close()

    def backend(self) -> Backend:
        """This process's inference client."""
        return self._client("backend", lambda: make_backend(self.settings), _close)

    def registry(self) -> NodeRegistry:
        """This process's client of the node registry (Redis)."""
        return self._client("registry", lambda: NodeRegistry.from_settings(self.settings), _close)

    def redis(self) -> Redis:
        """This process's Redis client for the jobs' token streams and cancel flags."""
        return self._client("redis", lambda: redis_client(self.settings), _close)

    def lock_store(self) -> RedisBackend:
        """This process's celery-singleton lock store (its jobs' locks and leases)."""
        return self._client("lock store", lambda: new_lock_store(self.app), close_lock_store)

    def close_clients(self) -> None:
        """Close this process's clients (a pool child does at exit, the worker at stop)."""
        with self._lock:
            self._forget_parent()
            clients, self._clients = self._clients, {}
        for client, close in clients.values():
            close(client)

    def _client(self, name: str, make: Callable[[], _C], close: Callable[[_C], None]) -> _C:
        """This process's client ``name``, made on first use; ``close`` closes it."""
        with self._lock:
            self._forget_parent()
            if name not in self._clients:
                self._clients[name] = (make(), close)
            client: _C = self._clients[name][0]
            return client

    def _forget_parent(self) -> None:
        """In a forked child the parent's clients are not ours to use or to close."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._clients = {}


def _close(client: Backend | NodeRegistry | Redis) -> None:
    client.close()


def held_by(app: object) -> Resources | None:
    """The resources of a started worker's app; None for any other app."""
    found = getattr(app, "resources", None)
    return found if isinstance(found, Resources) else None


def resources_of(app: Celery) -> Resources:
    """The resources of a started worker's app; a clear error anywhere else."""
    found = held_by(app)
    if found is None:
        raise RuntimeError(f"{app.main}: fleet jobs run only in a started worker")
    return found
