"""What this node serves, followed while it runs: the models its server serves, the lane
queues it consumes for them, and its record in the fleet registry.

A job is delivered only to nodes that consume its model's lane queues, so a node consumes
exactly the queues of the models its server serves now. A thread of the worker's main process
asks the server every ``models_refresh_s``; a model that appeared (pulled, loaded) gets its
queues consumed, one that went stops being consumed. The consumer's queues change on the
consumer's own thread (``Consumer.call_soon``, as Celery's ``add_consumer`` control does).
Which of its server's models it takes is ``choosing``'s: at most as many as fit in the server's
memory together, and a model whose jobs wait with no node to run them is taken on (pulled
first where it may) in place of one nobody waits for: a swap per decision, never per job.
Embedding models are chosen apart, within a limit of their own (``max_embedding_models``): a
small one stays loaded beside a chat model, so a node serves both without a swap.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from amqp.exceptions import NotFound
from celery import Celery, bootsteps
from celery.platforms import EX_OK
from celery.worker import state as worker_state
from celery.worker.state import active_requests
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.transport.native_delayed_delivery import bind_queue_to_native_delayed_delivery_exchange
from redis.exceptions import RedisError

from avocado_shared.fleet import ModelMeta, WorkerRecord, WorkerRegistry
from avocado_shared.routing import canonical_model, canonical_models
from avocado_shared.topology import (
    EMBED_QUEUE,
    GENERATE_QUEUE,
    SUMMARIZE_QUEUE,
    declare_lane_queues,
    lane_queues,
)
from ollama_worker.backends import make_backend, pull_progress
from ollama_worker.choosing import Demand, adoption, committed
from ollama_worker.drain import Cutoff
from ollama_worker.errors import AvocadoError, TransientError
from ollama_worker.settings import WorkerSettings

__all__ = ["DEFAULT_SLOTS", "FollowModels", "Serving", "server_slots"]

logger = logging.getLogger(__name__)

# Ollama runs 4 requests at once by default where memory allows (OLLAMA_NUM_PARALLEL).
DEFAULT_SLOTS = 4
# A model whose pull failed (not in the hub, no space) is not tried again before this.
PULL_AGAIN_S = 600.0
_BROKER_TIMEOUT_S = 10.0


def server_slots(settings: WorkerSettings) -> int:
    """Jobs this node runs at once: the setting, else what its server says, else 4."""
    if settings.slots is not None:
        return settings.slots
    try:
        with make_backend(settings) as client:
            said = client.slots()
    except (AvocadoError, ValueError, KeyError) as error:
        logger.warning("%s does not say how many requests it runs: %s", settings.server_url, error)
        said = None
    return said or DEFAULT_SLOTS


class Serving:
    """The models this node consumes, canonical name to its server's own name."""

    def __init__(self, app: Celery, settings: WorkerSettings, registry: WorkerRegistry) -> None:
        self.app = app
        self.settings = settings
        self.registry = registry
        self.models: dict[str, str] = {}
        self.found: dict[str, str] = {}  # every model its server has, as it said last
        self.loaded: list[str] = []
        # What its server said of each model it has: asked once per model, not per round.
        self.meta: dict[str, ModelMeta] = {}
        # Models whose jobs it takes at once: those that fit in its server's memory together.
        self.limit = settings.max_models or (None if settings.backend == "openai" else 1)
        self.embedding_limit = settings.max_embedding_models
        if self.embedding_limit is None and settings.backend != "openai":
            self.embedding_limit = 1
        # Embedding models named in the settings (an OpenAI-compatible server does not say).
        self.named_embedding = canonical_models(settings.embedding_models)
        self.slots = 1
        self.name = settings.worker_id
        self.cutoff = Cutoff.from_settings(settings)
        self.draining = False
        self._consumer: Any = None
        self._pull_failed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One broker connection for its rounds, made on first use, made again after a failure.
        self._broker: Connection | None = None

    def server_name(self, model: str) -> str:
        """``model`` as this node's server names it (``llama3.2`` for ``llama3.2:latest``)."""
        return self.models.get(canonical_model(model), model)

    def select(self) -> None:
        """Before the consumer starts: consume the queues of what the server serves now."""
        found = self._ask()
        try:
            if found is not None:
                self._describe(found)
                self._follow(found)
                self._adopt(found)
        finally:
            self._drop_broker()  # before the pool forks: no child inherits its socket

    def start(self, name: str, slots: int) -> Serving:
        """Keep following, in a daemon thread, and keep the fleet record of worker ``name``
        (its Celery node name), which runs ``slots`` jobs at once, fresh."""
        self.name, self.slots = name, slots
        try:  # in the registry before it consumes: a gateway asked at once knows its models
            self.registry.put(self.record())
        except RedisError as error:
            logger.warning("%s not in the fleet registry yet: %s", self.name, error)
        self._thread = threading.Thread(target=self._run, name="avocado-models", daemon=True)
        self._thread.start()
        return self

    def attach(self, consumer: Any) -> None:
        """The consumer started (again): later changes go to it."""
        with self._lock:
            self._consumer = consumer

    def detach(self) -> None:
        with self._lock:
            self._consumer = None

    def stop(self) -> None:
        """Leave the fleet registry at once; the thread ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.registry.remove(self.name)
        except RedisError as error:  # the record expires on its own in node_ttl_s
            logger.warning("could not withdraw %s: %s", self.name, error)
        finally:
            self.registry.close()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.models_refresh_s):
            try:
                self.tick()
            except Exception as error:
                logger.warning("models of %s not followed: %s", self.name, error)
                self._drop_broker()
        self._drop_broker()

    def _connection(self) -> Connection:
        """Its broker connection, reached again if it was lost."""
        if self._broker is None:
            self._broker = self.app.connection_for_write()
        self._broker.ensure_connection(max_retries=1, interval_start=0, timeout=_BROKER_TIMEOUT_S)
        return self._broker

    def _drop_broker(self) -> None:
        if self._broker is not None:
            self._broker.collect()
            self._broker = None

    def tick(self) -> None:
        """One round: follow the server's models, take on a waiting one when idle, drain
        before a cutoff, and refresh the record."""
        found = self._ask()
        if found is not None:
            self._describe(found)
            self._follow(found)
        self._drain()
        self.registry.put(self.record())  # first: a slow broker must not let it expire
        if found is not None and not self.draining:
            self._adopt(found)

    def _drain(self) -> None:
        """Stop taking jobs once one might not end before the cutoff; leave once none runs."""
        cutoff = self.cutoff
        if cutoff is None:
            return
        if not self.draining and cutoff.should_drain(self.settings.models_refresh_s):
            self.draining = True
            logger.warning(
                "%s drains: a job takes up to %.0f s here and it must be gone by %s",
                self.name,
                cutoff.expected_s(),
                (cutoff.at - timedelta(seconds=cutoff.margin_s)).isoformat(timespec="seconds"),
            )
            entry = [GENERATE_QUEUE, SUMMARIZE_QUEUE, EMBED_QUEUE]
            self._change([], [*self._queue_names(), *entry])
        if self.draining and not active_requests:
            logger.warning("%s leaves before its cutoff with no job in flight", self.name)
            worker_state.should_stop = EX_OK  # a warm shutdown, as SIGTERM starts

    def record(self) -> WorkerRecord:
        """What the fleet registry says of this node now."""
        return WorkerRecord(
            worker=self.name,
            backend=self.settings.backend,
            models=sorted(self.models),
            names={model: name for model, name in self.models.items() if model != name},
            loaded=sorted(self.loaded),
            meta={model: self.meta[model] for model in sorted(self.models) if model in self.meta},
            slots=self.slots,
            running=len(active_requests),
            cutoff=None if self.cutoff is None else self.cutoff.at,
            draining=self.draining,
            updated_at=datetime.now(timezone.utc),
            ttl_s=self.settings.node_ttl_s,
        )

    def _ask(self) -> dict[str, str] | None:
        """The server's models, canonical name to its own (and ``loaded``, what it holds in
        memory); None when it does not answer (its queues stay consumed: its jobs retry
        until it is back)."""
        try:
            with make_backend(self.settings) as client:
                names = client.models()
                loaded = [canonical_model(name) for name in client.loaded()]
        except (AvocadoError, ValueError, KeyError) as error:
            logger.warning("models of %s unknown: %s", self.settings.server_url, error)
            return None
        self.loaded = list(dict.fromkeys(loaded))
        self.found = {canonical_model(name): name for name in names if name.strip()}
        return self.found

    def _describe(self, found: dict[str, str]) -> None:
        """Ask the server what it says of each model it has that it was not asked of yet
        (whether it embeds decides how the model counts: ``_follow``). A server that cannot
        answer now is asked again next round; one that will not say (an older Ollama, a model
        it cannot show) leaves the model with no metadata."""
        new = [model for model in found if model not in self.meta]
        if not new:
            return
        with make_backend(self.settings) as client:
            for model in new:
                try:
                    self.meta[model] = client.describe(found[model])
                except TransientError as error:
                    logger.warning("%s not described, asked again: %s", model, error)
                    return
                except (AvocadoError, ValueError, KeyError) as error:
                    logger.warning("%s says nothing of %s: %s", self.name, model, error)
                    self.meta[model] = ModelMeta()

    def _follow(self, found: dict[str, str]) -> None:
        """Take the jobs of the models ``choosing.committed`` picks of those in ``found``:
        chat models and embedding models each within their own limit."""
        chosen = []
        for embeds, default in (
            (False, self.settings.default_model),
            (True, self.settings.embed_model),
        ):
            chosen += committed(
                self._of_kind(self.models, embeds),
                self._of_kind(found, embeds),
                self.loaded,
                canonical_model(default),
                self._limit(embeds),
            )
        self._serve({model: found[model] for model in chosen})

    def _of_kind(self, models: Iterable[str], embeds: bool) -> list[str]:
        """Those of ``models`` that are embedding models (``embeds``) or chat models."""
        return [model for model in models if self._embeds(model) is embeds]

    def _embeds(self, model: str) -> bool:
        """Whether ``model`` is an embedding model: named so in the settings, or its server
        said so (``embedding`` in Ollama's capabilities; an Ollama before 0.6 says nothing,
        and such models count as chat models)."""
        meta = self.meta.get(model)
        return model in self.named_embedding or (
            meta is not None and "embedding" in meta.capabilities
        )

    def _limit(self, embeds: bool) -> int | None:
        return self.embedding_limit if embeds else self.limit

    def _serve(self, models: dict[str, str]) -> None:
        """Consume the queues of ``models`` and only those (nothing new while draining)."""
        added = sorted(set(models) - set(self.models))
        removed = sorted(set(self.models) - set(models))
        gone = [queue.name for model in removed for queue in lane_queues(model, self.settings)]
        self.models = dict(models)
        if added or removed:
            logger.info("%s serves %s", self.name, ", ".join(sorted(models)) or "none")
        if self.draining:
            return
        self._change([queue for model in added for queue in self._declare(model)], gone)

    def _queue_names(self) -> list[str]:
        """The lane queues of the models it serves."""
        return [queue.name for model in self.models for queue in lane_queues(model, self.settings)]

    def _declare(self, model: str) -> list[Queue]:
        """Declare ``model``'s lane queues and bind them for retries with a countdown (a
        least-privilege worker may: ``avocado_shared.admin``)."""
        connection = self._connection()
        queues = declare_lane_queues(connection, model, self.settings)
        for queue in queues:
            try:
                bind_queue_to_native_delayed_delivery_exchange(connection, queue)
            except NotFound:  # not declared yet: the consumer's step binds at its start
                logger.debug("%s bound to delayed delivery at the consumer's start", queue)
        return queues

    def _change(self, added: list[Queue], removed: list[str]) -> None:
        """Consume ``added`` and stop consuming ``removed``: on the consumer's thread once
        it runs, directly before."""
        with self._lock:
            consumer = self._consumer
        if consumer is None:
            _select(self.app, added, removed)
        elif added or removed:
            consumer.call_soon(_consume, consumer, added, removed)

    def _adopt(self, found: dict[str, str]) -> None:
        """Take on a model whose jobs wait with no node to run them (``choosing.adoption``):
        one per round, claimed in Redis so that two idle nodes do not both swap to it, and
        pulled first when the server lacks it."""
        now = time.monotonic()
        can_fetch = self.settings.backend == "ollama" and self.settings.allow_pull
        takeable = [
            m
            for m in self.registry.wanted()
            if m not in self.models
            and (m in found or can_fetch)
            and now - self._pull_failed.get(m, -PULL_AGAIN_S) >= PULL_AGAIN_S
        ]
        waiting = {model: self._demand(model) for model in takeable}
        if not any(d.ready and not d.consumers for d in waiting.values()):
            return  # nothing waits for a node: the broker need not be asked more
        own = {model: self._demand(model) for model in self.models}
        move = None
        for embeds in (False, True):
            move = move or adoption(
                self._of_kind(self.models, embeds),
                {m: d for m, d in waiting.items() if self._embeds(m) is embeds},
                own,
                found=found,
                can_fetch=can_fetch,
                limit=self._limit(embeds),
            )
        if move is None or not self._claim(move.take):
            return
        if move.take not in found:
            try:
                self._pull(move.take)
            except AvocadoError as error:
                self._pull_failed[move.take] = now
                logger.warning(
                    "%s not pulled (its jobs wait; next try in %.0f s): %s",
                    move.take,
                    PULL_AGAIN_S,
                    error,
                )
                return
        logger.info(
            "%s takes on %s, whose jobs wait with no node%s",
            self.name,
            move.take,
            f", in place of {move.give_up}" if move.give_up else "",
        )
        models = {m: name for m, name in self.models.items() if m != move.give_up}
        self._serve({**models, move.take: found.get(move.take, move.take)})

    def _claim(self, model: str) -> bool:
        """Whether this node may take ``model`` on now: no other node claimed it lately."""
        key = f"{self.settings.key_prefix}adopting:{model}"
        hold = max(1, math.ceil(self.settings.models_refresh_s * 4))
        return bool(self.registry.client.set(key, self.name, nx=True, ex=hold))

    def _demand(self, model: str) -> Demand:
        """``model``'s jobs ready in both lanes, and the most consumers of a lane."""
        depths = [self._depth(queue.name) for queue in lane_queues(model, self.settings)]
        return Demand(sum(d[0] for d in depths), max(d[1] for d in depths))

    def _depth(self, name: str) -> tuple[int, int]:
        """Messages ready in queue ``name`` and its consumers; (0, 0) for no such queue."""
        try:
            declared = self._connection().default_channel.queue_declare(name, passive=True)
        except NotFound:
            return 0, 0
        return int(declared.message_count), int(declared.consumer_count)

    def _pull(self, model: str) -> None:
        with make_backend(self.settings) as client:
            logger.info("jobs for %s wait with no node to run them: pulling it", model)
            client.pull(model, progress=pull_progress(model))


def _select(app: Celery, added: list[Queue], removed: list[str]) -> None:
    queues = app.amqp.queues
    for queue in added:
        queues.select_add(queue)
    if removed:
        queues.deselect(removed)


def _consume(consumer: Any, added: list[Queue], removed: list[str]) -> None:
    """On the consumer's thread: start and stop consuming, as Celery's control commands do."""
    for queue in added:
        consumer.app.amqp.queues.select_add(queue)
        consumer.add_task_queue(queue.name)
    for name in removed:
        consumer.cancel_task_queue(name)


def _serving(app: Celery) -> Serving | None:
    """The ``Serving`` of a started worker's app; None for any other app."""
    found = getattr(getattr(app, "resources", None), "serving", None)
    return found if isinstance(found, Serving) else None


class FollowModels(bootsteps.StartStopStep):  # type: ignore[misc]
    """Hands the running consumer to ``Serving``, so the queues it consumes follow the
    server's models."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        serving = _serving(c.app)
        if serving is not None:
            serving.attach(c)

    def stop(self, c: Any) -> None:
        serving = _serving(c.app)
        if serving is not None:
            serving.detach()

    shutdown = stop
