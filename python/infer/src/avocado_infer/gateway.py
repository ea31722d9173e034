"""What one gateway process holds for its life: the fleet's producer, Redis clients (an
asyncio one for token streams, read on the event loop; a blocking one for the rest), the node
registry and the ledger, the job state reader, the app's metrics, the API keys and their
limits; made in the app's lifespan, closed there."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import redis
import redis.asyncio
from starlette.concurrency import run_in_threadpool

from avocado_infer.backlog import Backlog
from avocado_infer.errors import ModelNotServed, QueueFull, RegistryUnavailable
from avocado_infer.fleet_view import FleetView
from avocado_infer.job_state import JobStates, JobView
from avocado_infer.ledger import Ledger, Noted
from avocado_infer.limits import Limiter, Slot
from avocado_infer.metrics import GatewayMetrics, MeteredStream
from avocado_infer.settings import InferSettings
from avocado_shared.contracts import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    JobKind,
    JobResult,
    SummarizeRequest,
    SummarizeResult,
    ToolCall,
    Usage,
    parse_result,
)
from avocado_shared.errors import AvocadoError, TransientError, Unavailable
from avocado_shared.fleet import ModelMeta, WorkerRecord, WorkerRegistry
from avocado_shared.flow import BrokerBlocked, causes
from avocado_shared.jobs import JobHandle, PublishError, PublishOutcomeUnknown
from avocado_shared.keys import ApiKey, KeyStore
from avocado_shared.producer import Producer
from avocado_shared.redis_clients import async_redis_client, redis_client
from avocado_shared.routing import Lane, canonical_model, lane_queue_name
from avocado_shared.store import JobStatus, StoreError
from avocado_shared.streams import StreamFailed

__all__ = ["Gateway", "ServedModel", "StoredAnswer"]

logger = logging.getLogger(__name__)

# How long the gateway trusts what it read of the models the fleet serves.
_SERVED_FRESH_S = 1.0


@dataclass(frozen=True)
class StoredAnswer:
    """A generation's answer as its worker stored it."""

    text: str
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ServedModel:
    """A model the fleet serves: when a node last said so, until when its nodes vouch for it,
    the nodes that serve it and those that hold it loaded, the jobs waiting per lane, and
    what the freshest node that described it said of it (``meta``)."""

    name: str
    seen_at: datetime
    expires_at: datetime
    nodes: tuple[WorkerRecord, ...]
    loaded_on: tuple[str, ...]
    backlog: dict[str, int | None]
    shown: str | None = None
    meta: ModelMeta | None = None

    @property
    def label(self) -> str:
        """The name to list it by: its servers' own (``smollm2`` on a server that lists no
        tag), else the canonical one."""
        return self.shown or self.name

    @property
    def loaded(self) -> bool:
        return bool(self.loaded_on)

    def view(self) -> dict[str, Any]:
        """Its nodes and backlog as the APIs show them (under ``avocado``)."""
        nodes = [
            {
                "worker": node.worker,
                "loaded": node.worker in self.loaded_on,
                "slots": node.slots,
                "running": node.running,
                "draining": node.draining,
                "time_left_s": node.time_left_s(),
            }
            for node in self.nodes
        ]
        return {"nodes": nodes, "backlog": self.backlog}


def _not_served(model: str, served: set[str]) -> ModelNotServed:
    listed = ", ".join(sorted(served)) or "none"
    return ModelNotServed(
        f"model {model!r} not found: no live node serves it (the fleet serves: {listed})"
    )


class Gateway:
    """The gateway's long-lived clients; every blocking call runs off the event loop."""

    def __init__(self, settings: InferSettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        fleet = settings.fleet
        self.redis = redis_client(fleet)
        # Each streamed answer waits in XREAD on a connection of its own: on the event loop,
        # a piece reaches its client without a hop through a thread.
        self.streams = async_redis_client(fleet)
        self.workers = WorkerRegistry(self.redis, fleet.key_prefix)
        self.keys = KeyStore(self.redis, fleet.key_prefix)
        self.limiter = Limiter(self.redis, fleet.key_prefix, settings.slot_lease_s)
        self.producer = Producer(fleet)
        self.ledger = Ledger(self.redis, fleet.key_prefix, fleet.result_expires_s)
        self.jobs = JobStates(self.producer, self.ledger, settings.ready_timeout_s)
        self.fleet_view = FleetView(self)  # what the web page's fleet view shows
        self._backlogs: dict[str, Backlog] = {}
        self._served: tuple[float, set[str]] = (-_SERVED_FRESH_S, set())
        self.started_at = datetime.now(timezone.utc)

    def backlog(self, model: str, lane: Lane) -> Backlog:
        """The depth of ``model``'s ``lane`` queue as this gateway knows it."""
        queue = lane_queue_name(model, lane)
        found = self._backlogs.get(queue)
        if found is None:
            found = self._backlogs[queue] = Backlog(
                self.producer, queue, self.settings.ready_timeout_s
            )
        return found

    async def check_backlog(self, model: str, lane: Lane) -> None:
        """``QueueFull`` while ``model``'s ``lane`` queue holds ``max_queue`` jobs or more,
        as the broker counts them (``Backlog``)."""
        limit = self.settings.max_queue
        if not limit:
            return
        # A thread only to ask the broker (once a second): a hop fewer on most first tokens.
        backlog = self.backlog(model, lane)
        fresh = backlog.fresh()
        depth = backlog.estimate(read=False) if fresh else await run_in_threadpool(backlog.estimate)
        if depth is not None and depth >= limit:
            depth = await run_in_threadpool(backlog.confirmed)
        if depth is not None and depth >= limit:
            raise QueueFull(
                f"{depth} {lane.value} jobs for {model} wait in the queue, as many as this "
                f"gateway lets wait (AVOCADO_INFER_MAX_QUEUE={limit}): try again later",
                retry_after=self.settings.busy_retry_after_s,
            )

    async def check_served(self, model: str) -> None:
        """``ModelNotServed`` when no live node serves ``model`` (read at most once a second),
        unless the gateway holds such requests for nodes that come on demand."""
        if self.settings.hold_unserved:
            return
        read_at, served = self._served
        if time.monotonic() - read_at >= _SERVED_FRESH_S or model not in served:
            served = await run_in_threadpool(self._read_served)
        if model not in served:
            raise _not_served(model, served)

    def _read_served(self) -> set[str]:
        try:
            served = self.workers.served()
        except redis.RedisError as error:
            raise RegistryUnavailable(f"the fleet registry is not readable: {error}") from error
        self._served = (time.monotonic(), served)
        return served

    async def generate(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        lane: Lane = Lane.INTERACTIVE,
        owner: str | None = None,
        **fields: Any,
    ) -> JobHandle[GenerateResult]:
        """Publish a generation job in ``lane``, noted as the job of the key named ``owner``
        (``ownership``): ``InvalidRequest`` before anything is queued,
        ``ModelNotServed`` when no live node serves its model, ``QueueFull`` when its lane's
        backlog is at the limit. A job not published is a ``PublishError`` with a
        ``retry_after``; one whose publish has an unknown outcome (the broker blocked
        publishing right after it was sent) is cancelled, as no one would read its answer when
        the broker takes it later: a ``TransientError``."""
        request = self.producer.generate_request(prompt, messages=messages, **fields)
        return cast(JobHandle[GenerateResult], await self._publish(request, lane, owner))

    async def embed(
        self,
        input: str | Sequence[str],
        *,
        lane: Lane = Lane.INTERACTIVE,
        owner: str | None = None,
        **fields: Any,
    ) -> JobHandle[EmbedResult]:
        """Publish an embedding job in ``lane``, noted and refused as ``generate``'s."""
        request = self.producer.embed_request(input, **fields)
        return cast(JobHandle[EmbedResult], await self._publish(request, lane, owner))

    async def _publish(
        self, request: GenerateRequest | EmbedRequest, lane: Lane, owner: str | None
    ) -> JobHandle[JobResult]:
        """Publish a validated request unless its model is not served or its lane is full."""
        fleet = self.settings.fleet
        model = canonical_model(request.model or fleet.default_model)
        await self.check_served(model)
        await self.check_backlog(model, lane)
        try:
            handle = await run_in_threadpool(self._submit, request, lane, model, owner)
        except PublishOutcomeUnknown as error:
            raise await self._cancelled(error) from error
        except PublishError as error:
            error.retry_after = self.settings.busy_retry_after_s
            raise
        self.backlog(model, lane).published()
        return handle

    def _submit(
        self, request: GenerateRequest | EmbedRequest, lane: Lane, model: str, owner: str | None
    ) -> JobHandle[JobResult]:
        handle = self.producer.submit(request, lane)
        kind = JobKind.GENERATE if isinstance(request, GenerateRequest) else JobKind.EMBED
        self._note(handle.id, kind, None, lane_queue_name(model, lane), owner)
        return handle

    def _note(
        self, job_id: str, kind: JobKind, share_id: str | None, queue: str, owner: str | None
    ) -> None:
        """Note a published job in the ledger; a job not noted runs all the same, but reads
        404 until it starts, and to admin keys only."""
        try:
            self.ledger.note(job_id, kind, share_id, queue, owner)
        except redis.RedisError as error:
            logger.warning("%s job %s queued but not noted: %s", kind.value, job_id, error)

    async def owned_by(self, job_id: str, owner: str) -> bool:
        """Whether the key named ``owner`` queued ``job_id`` through a gateway."""
        try:
            return await run_in_threadpool(self.ledger.owned_by, job_id, owner)
        except redis.RedisError as error:
            raise Unavailable(f"job {job_id}: Redis did not answer: {error}") from error

    async def _cancelled(self, error: PublishOutcomeUnknown) -> TransientError:
        """Cancel a job sent but not confirmed; what its client is told."""
        try:
            await run_in_threadpool(self.producer.cancel, error.job_id)
        except AvocadoError as failed:
            logger.warning("job %s, sent, not cancelled: %s", error.job_id, failed)
        blocked = next((e for e in causes(error) if isinstance(e, BrokerBlocked)), None)
        why = f"the broker blocked publishing ({blocked.reason})" if blocked else "no confirm came"
        return TransientError(
            f"job {error.job_id} sent, then {why}; it is cancelled: send the request again",
            retry_after=self.settings.busy_retry_after_s,
        )

    async def summarize(
        self, request: SummarizeRequest, owner: str | None = None
    ) -> JobHandle[SummarizeResult]:
        """Publish a summary job, or find the one of its share id that is queued or running
        (its singleton lock), and note it in the ledger, so its state reads queued and it
        belongs to the key named ``owner`` (as well as to any key that asked before)."""
        return await run_in_threadpool(self._summarize, request, owner)

    def _summarize(
        self, request: SummarizeRequest, owner: str | None
    ) -> JobHandle[SummarizeResult]:
        handle = self.producer.summarize(
            request.share_id,
            request.content.model_dump(exclude_none=True),
            options=request.options.model_dump(exclude_none=True),
        )
        model = request.options.model or self.settings.fleet.default_model
        queue = lane_queue_name(model, Lane.BATCH)
        self._note(handle.id, JobKind.SUMMARIZE, request.share_id, queue, owner)
        return handle

    async def cancel(self, job_id: str) -> None:
        """Cancel ``job_id``: queued, it never runs; running, it stops at its next chunk."""
        await run_in_threadpool(self.producer.cancel, job_id)

    async def stored(self, job_id: str) -> StoredAnswer | None:
        """The generation's answer once its worker stored it (an embedding's: no text); None
        before, or when the results database cannot be read now. ``StreamFailed`` when it
        failed for good."""
        result = await self.result(job_id)
        if result is None:
            return None
        if not isinstance(result, GenerateResult):
            return StoredAnswer("", result.usage())
        return StoredAnswer(result.text, result.usage(), tuple(result.tool_calls))

    async def result(self, job_id: str) -> JobResult | None:
        """The job's result once its worker stored it; None before, or when the results
        database cannot be read now. ``StreamFailed`` when it failed for good."""
        try:
            row = await run_in_threadpool(self.producer.results.get, job_id)
        except StoreError as error:
            logger.warning("job %s: its stored result not readable: %s", job_id, error)
            return None
        if row is None or row.status in (JobStatus.STARTED, JobStatus.RETRY):
            return None
        if row.status is not JobStatus.SUCCESS or row.result is None:
            raise StreamFailed(f"job {job_id} failed: {row.error}")
        return parse_result(row.result)

    async def key(self, secret: str) -> ApiKey | None:
        """The API key of ``secret``; None when it is unknown or revoked."""
        return await self.keys.verify(self.streams, secret)

    async def admit(self, key: ApiKey) -> Slot | None:
        """A slot of ``key``'s (None when it has no concurrency limit); ``OverLimit`` when
        the key is over one of its limits."""
        return await run_in_threadpool(self.limiter.admit, key)

    async def release(self, slot: Slot) -> None:
        await run_in_threadpool(self.limiter.release, slot)

    async def job(self, job_id: str, noted: Noted | None = None) -> JobView:
        """What ``GET /jobs/{id}`` says of ``job_id``."""
        return await run_in_threadpool(self.jobs.view, job_id, noted)

    async def summary(self, share_id: str) -> tuple[JobView, dict[str, Any] | None]:
        """The newest summary job of ``share_id`` and its result once it succeeded."""
        return await run_in_threadpool(self.jobs.summary, share_id)

    def stream(self, job_id: str) -> MeteredStream:
        """The token stream of ``job_id``, metered as it is read."""
        return MeteredStream(self.streams, self.settings.fleet.key_prefix, job_id, self.metrics)

    async def models(self) -> list[ServedModel]:
        """The models live nodes serve, by name, each with its nodes and backlog."""
        return await run_in_threadpool(self.served_models)

    async def model(self, name: str) -> ServedModel:
        """The model ``name`` (canonical, or as its servers name it) as live nodes serve it;
        ``ModelNotServed`` when none does."""
        model = canonical_model(name)
        served = await self.models()
        found = next((m for m in served if m.name == model), None)
        if found is None:
            raise _not_served(name, {m.name for m in served})
        return found

    def served_models(self) -> list[ServedModel]:
        """``models``, read here (blocking): for a thread, as a metrics scrape is."""
        try:
            records = self.workers.live()
        except redis.RedisError as error:
            raise RegistryUnavailable(f"the fleet registry is not readable: {error}") from error
        names = sorted({model for record in records for model in record.models})
        served = []
        for name in names:
            nodes = tuple(r for r in records if name in r.models)
            described = sorted((r for r in nodes if name in r.meta), key=lambda r: r.updated_at)
            served.append(
                ServedModel(
                    name=name,
                    seen_at=max(r.updated_at for r in nodes),
                    expires_at=max(r.expires_at for r in nodes),
                    nodes=nodes,
                    loaded_on=tuple(r.worker for r in nodes if name in r.loaded),
                    backlog={lane.value: self.backlog(name, lane).estimate() for lane in Lane},
                    shown=next((r.names[name] for r in nodes if name in r.names), None),
                    meta=described[-1].meta[name] if described else None,
                )
            )
        return served

    async def unready(self) -> dict[str, str]:
        """What the gateway cannot reach now (broker, Redis) and why; empty when ready."""
        return await run_in_threadpool(self._unready)

    def _unready(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        timeout = self.settings.ready_timeout_s
        with self.producer.app.connection_for_write() as connection:
            try:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            except Exception as error:  # kombu wraps socket, AMQP and auth errors alike
                problems["broker"] = str(error) or type(error).__name__
        try:
            self.redis.ping()
        except redis.RedisError as error:
            problems["redis"] = str(error) or type(error).__name__
        return problems

    async def close(self) -> None:
        """Release the broker and Redis connections."""
        self.producer.close()
        self.redis.close()
        await self.streams.aclose()
