"""The producer API: validate a job, publish it with confirms, hand back a result handle."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, cast

from amqp.exceptions import AMQPError, MessageNacked
from celery.result import AsyncResult
from celery.utils import uuid
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from avocado_shared.cancel import request_cancel
from avocado_shared.celery_config import make_celery
from avocado_shared.contracts import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InvalidRequest,
    JobResult,
    SummarizeRequest,
    SummarizeResult,
    Tool,
    ToolChoice,
    validate_request,
)
from avocado_shared.flow import (
    BrokerBlocked,
    FlowGate,
    SentUnconfirmed,
    blocked_reason,
    causes,
    flow_transport_path,
    maybe_sent,
)
from avocado_shared.jobs import (
    JobFailed,
    JobHandle,
    NotFinished,
    PublishError,
    PublishOutcomeUnknown,
)
from avocado_shared.overrides.singleton import register_job_tasks
from avocado_shared.routing import LANE_HEADER, WANTED_MODELS, Lane, lane_queue_name, model_of
from avocado_shared.settings import Settings
from avocado_shared.store import ResultStore
from avocado_shared.tls import refuse_untrusted
from avocado_shared.topology import (
    EMBED_TASK,
    GENERATE_TASK,
    JOB_TASKS,
    ML_EXCHANGE,
    SUMMARIZE_TASK,
    declare_lane_queues,
    declare_topology,
)
from avocado_shared.tracing import inject_headers, publish_span

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11

__all__ = [
    "SENT_AT_HEADER",
    "JobFailed",
    "JobHandle",
    "NotFinished",
    "Producer",
    "PublishError",
    "PublishOutcomeUnknown",
    "embed",
    "generate",
    "summarize",
]


class GenerateFields(TypedDict, total=False):
    """A generation's fields besides its prompt (``GenerateRequest``'s)."""

    messages: Sequence[ChatMessage | Mapping[str, Any]] | None
    model: str | None
    system: str | None
    images: Sequence[str] | None
    options: Mapping[str, Any] | None
    format: str | Mapping[str, Any] | None
    keep_alive: str | int | None
    idempotency_key: str | None
    tools: Sequence[Tool | Mapping[str, Any]] | None
    tool_choice: ToolChoice | str | Mapping[str, Any] | None
    parallel_tool_calls: bool | None


class EmbedFields(TypedDict, total=False):
    """An embedding's fields besides its input (``EmbedRequest``'s)."""

    model: str | None
    share_id: str | None
    dimensions: int | None
    truncate: bool
    options: Mapping[str, Any] | None
    keep_alive: str | int | None
    idempotency_key: str | None


_TASKS: dict[type[Any], str] = {
    GenerateRequest: GENERATE_TASK,
    SummarizeRequest: SUMMARIZE_TASK,
    EmbedRequest: EMBED_TASK,
}

# When the job was published (epoch seconds); workers measure its queue wait from it.
SENT_AT_HEADER = "x-avocado-sent-at"

# How often a producer marks a model it publishes for as wanted again.
_WANTED_EVERY_S = 60.0

# What a submission can meet on its way out; Celery's result consumer raises RuntimeError
# when it gave up reconnecting to the result backend.
_PUBLISH_ERRORS = (
    KombuError,
    AMQPError,
    MessageNacked,
    RedisError,
    OSError,
    RuntimeError,
    BrokerBlocked,
    SentUnconfirmed,
)


class Producer:
    """Publishes jobs onto the fleet's quorum queues; one per process is enough."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.app = make_celery("avocado-producer", self.settings)
        # Its publishes learn when the broker blocks them (``flow``); workers wait it out.
        transport = flow_transport_path(self.settings.broker_urls[0])
        if transport is not None:
            self.app.conf.broker_transport = transport
        register_job_tasks(self.app)
        self._declared = False
        self._declared_models: set[str] = set()
        self._wanted_at: dict[str, float] = {}  # when each model was last marked wanted
        self._lock = threading.Lock()
        self._results: ResultStore | None = None
        self._flow = FlowGate(
            lambda: self.app.connection_for_write(transport_options={"confirm_publish": False})
        )

    @property
    def results(self) -> ResultStore:
        """``ml_results``, where workers store every job's outcome for good (Redis expires)."""
        with self._lock:
            if self._results is None:
                self._results = ResultStore.from_settings(self.settings)
            return self._results

    def generate(
        self,
        prompt: str | None = None,
        *,
        lane: Lane = Lane.BATCH,
        **fields: Unpack[GenerateFields],
    ) -> JobHandle[GenerateResult]:
        """Enqueue a prompt or chat generation in ``lane``; raises ``InvalidRequest`` before
        publishing."""
        request = self.generate_request(prompt, **fields)
        return cast(JobHandle[GenerateResult], self.submit(request, lane))

    def generate_request(
        self, prompt: str | None = None, **fields: Unpack[GenerateFields]
    ) -> GenerateRequest:
        """A generation request, validated (``InvalidRequest``), its model the fleet's default
        when it names none; ``submit`` publishes it."""
        model = fields.get("model")
        given: dict[str, Any] = {
            **fields,
            "prompt": prompt,
            "model": self.settings.default_model if model is None else model,
            "options": dict(fields.get("options") or {}),
        }
        return validate_request(GenerateRequest, given)

    def summarize(
        self,
        share_id: str,
        content: str | Mapping[str, Any],
        *,
        options: Mapping[str, Any] | None = None,
        lane: Lane = Lane.BATCH,
    ) -> JobHandle[SummarizeResult]:
        """Enqueue a summary in ``lane``; ``content`` is the text or a mapping with ``text``."""
        body = {"text": content} if isinstance(content, str) else dict(content)
        options = {"model": self.settings.default_model, **(options or {})}
        fields = {"share_id": share_id, "content": body, "options": options}
        request = validate_request(SummarizeRequest, fields)
        return cast(JobHandle[SummarizeResult], self.submit(request, lane))

    def embed(
        self, input: str | Sequence[str], *, lane: Lane = Lane.BATCH, **fields: Unpack[EmbedFields]
    ) -> JobHandle[EmbedResult]:
        """Enqueue the embedding of one text or a list (one job) in ``lane``; with a
        ``share_id``, the item's embedding, one job at a time like its summary."""
        request = self.embed_request(input, **fields)
        return cast(JobHandle[EmbedResult], self.submit(request, lane))

    def embed_request(
        self, input: str | Sequence[str], **fields: Unpack[EmbedFields]
    ) -> EmbedRequest:
        """An embedding request, validated (``InvalidRequest``), its model the fleet's
        ``embed_model`` when it names none."""
        model = fields.get("model")
        given: dict[str, Any] = {
            **fields,
            "input": input if isinstance(input, str) else list(input),
            "model": self.settings.embed_model if model is None else model,
            "options": dict(fields.get("options") or {}),
        }
        return validate_request(EmbedRequest, given)

    def submit(
        self,
        request: GenerateRequest | SummarizeRequest | EmbedRequest,
        lane: Lane = Lane.BATCH,
        job_id: str | None = None,
        watched: bool = True,
    ) -> JobHandle[JobResult]:
        """Publish a validated request to its model's ``lane`` queue, persistent and
        confirmed; duplicates share one job. The queue is declared first, so a job for a model
        no node serves yet waits durably for one that does.

        A summary or an embedding with the same ``share_id``, or a generation or an embedding
        with the same ``idempotency_key``, that is still queued or running is not published
        again. ``job_id``: the job's id, when the caller derives it (a batch's line: its
        results are found again by it); a new one when None.

        ``watched=False``: no one waits on the handle (its ``ml_results`` row is read instead),
        so the job goes without a Celery result. Celery subscribes a publisher to each job's
        result channel and unsubscribes when the handle is dropped, but the replies are read
        only while some handle is waited on: a process that publishes many jobs and waits on
        none keeps a channel name per job and Redis an unread reply, until it waits again.
        """
        task = _TASKS[type(request)]
        body = request.model_dump(mode="json", exclude_none=True)
        self._check_size(task, body)
        model = model_of(body, self.settings.default_model, self.settings.embed_model)
        task_id = job_id or uuid()
        queue = lane_queue_name(model, lane)
        try:
            self._ensure_topology(model)
            with publish_span(task, task_id, queue), self.app.producer_or_acquire() as publisher:
                connection = self._ready(publisher)
                try:
                    result = self.app.tasks[task].apply_async(
                        kwargs={"request": body},
                        task_id=task_id,
                        producer=publisher,
                        exchange=ML_EXCHANGE.name,
                        routing_key=queue,
                        retry=False,  # sent once: a retry could queue a second copy
                        # Declared once by _ensure_topology; kombu would declare again on
                        # each new connection and wait for the answer without a timeout.
                        declare=[],
                        confirm_timeout=self.settings.publish_timeout_s,
                        headers=inject_headers(
                            {SENT_AT_HEADER: time.time(), LANE_HEADER: lane.value}
                        ),
                        # The worker's limits apply: they are set for its hardware and
                        # consumer timeout.
                        time_limit=None,
                        soft_time_limit=None,
                        ignore_result=not watched,
                    )
                except _PUBLISH_ERRORS as error:
                    # Not for reuse: a confirm may still arrive on it, or the broker closed
                    # the channel (a refused message); the next publish reconnects.
                    connection.collect()
                    raise self._publish_error(task, task_id, error) from error
        except PublishError:
            raise
        except BrokerBlocked as blocked:  # known before anything was sent
            self._flow.watch(blocked.reason)
            raise PublishError(
                f"{task} not published: the broker blocks publishing ({blocked.reason})"
            ) from None
        except _PUBLISH_ERRORS as error:  # before sending: connecting, locking, declaring
            raise PublishError(f"{task} not published: {_describe(error)}") from error
        return JobHandle(result)

    def _ready(self, publisher: Any) -> Any:
        """The publisher's connection, fit to publish on and nothing sent yet: connecting
        again is safe here, publishing again would not be. A pooled connection the broker
        closed since (a restart) is replaced; ``BrokerBlocked`` when the broker blocks
        publishing, as this producer's gate or the connection itself knows."""
        reason = self._flow.blocked()
        if reason is not None:
            raise BrokerBlocked(reason)
        connection = publisher.connection
        connection.ensure_connection(max_retries=2, interval_start=0.2, errback=refuse_untrusted)
        try:
            reason = blocked_reason(connection)
        except connection.connection_errors:  # the broker closed it since its last use
            connection.collect()
            publisher.revive(connection)
            connection.ensure_connection(
                max_retries=2, interval_start=0.2, errback=refuse_untrusted
            )
            reason = blocked_reason(connection)
        if reason is not None:
            raise BrokerBlocked(reason)
        connection.connection.abort_on_blocked = True
        return connection

    def _check_size(self, task: str, body: Mapping[str, Any]) -> None:
        """Refuse a job over ``max_request_bytes`` before anything is locked or sent."""
        size = len(json.dumps(body, separators=(",", ":")).encode())
        limit = self.settings.max_request_bytes
        if size > limit:
            raise InvalidRequest(
                f"{task} request of {size} bytes is over the limit of {limit} bytes "
                "(AVOCADO_MAX_REQUEST_BYTES, kept below RabbitMQ's max_message_size)"
            )

    def _publish_error(self, task: str, task_id: str, error: Exception) -> PublishError:
        """What a failed submission tells its caller: not published, or an unknown outcome."""
        chain = causes(error)
        sent = next((e for e in chain if isinstance(e, SentUnconfirmed)), None)
        task_id = sent.job_id if sent is not None else task_id  # a republish keeps its id
        blocked = next((e for e in chain if isinstance(e, BrokerBlocked)), None)
        if blocked is not None:
            self._flow.watch(blocked.reason)
            return PublishOutcomeUnknown(
                f"{task} {task_id} sent, then the broker blocked publishing "
                f"({blocked.reason}): the broker holds it, and it was not sent again; "
                "submit it again with the same share_id or idempotency_key to be sure",
                task_id,
            )
        if maybe_sent(error):  # SentUnconfirmed is raised from such an error too
            return PublishOutcomeUnknown(
                f"{task} {task_id} sent but not confirmed: {_describe(error)}; it may be "
                "queued once and was not sent again",
                task_id,
            )
        return PublishError(f"{task} not published: {_describe(error)}")

    def cancel(self, job_id: str) -> None:
        """Cancel ``job_id`` (``avocado_shared.cancel``): queued, it never runs; generating,
        it stops at its next chunk. Its handle then raises ``JobFailed`` (JobCancelled)."""
        request_cancel(self._lock_store(), self.settings.key_prefix, job_id)

    def _lock_store(self) -> Any:
        """The Redis client of the jobs' locks, also for cancel flags and wanted models."""
        return self.app.tasks[GENERATE_TASK].singleton_backend.redis

    def handle(self, job_id: str) -> JobHandle[JobResult]:
        """A handle for a job submitted earlier, by its id."""
        return JobHandle(AsyncResult(job_id, app=self.app))

    def close(self) -> None:
        """Release broker, backend, lock and database connections."""
        self._flow.close()
        for name in JOB_TASKS:
            self.app.tasks[name].close_lock_store()
        self.app.close()
        if self._results is not None:
            self._results.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_topology(self, model: str) -> None:
        """Declare the queues (unless a least-privilege user may not), and ``model``'s lane
        queues, before the first publish to them, so no job goes to an unbound exchange;
        then mark ``model`` wanted, for a node with room to take it on."""
        if model not in self._declared_models:
            with self._lock:
                if model not in self._declared_models:
                    self._declare(model)
                    self._declared_models.add(model)
        self._mark_wanted(model)

    def _declare(self, model: str) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=2, interval_start=0.2, errback=refuse_untrusted
            )
            if not self._declared and self.settings.declare_topology:
                declare_topology(connection, self.settings)
            self._declared = True
            declare_lane_queues(connection, model, self.settings)

    def _mark_wanted(self, model: str) -> None:
        """Add ``model`` to the wanted set once a minute at most: a set Redis lost (a restart
        without persistence, a flush) is whole again a minute later."""
        now = time.monotonic()
        if now - self._wanted_at.get(model, -_WANTED_EVERY_S) < _WANTED_EVERY_S:
            return
        self._lock_store().sadd(f"{self.settings.key_prefix}{WANTED_MODELS}", model)
        self._wanted_at[model] = now


_default: Producer | None = None
_default_lock = threading.Lock()


def _describe(error: BaseException) -> str:
    """Why a publish failed, in the words of whoever raised it (the broker's for a refusal)."""
    chain = [e for e in causes(error) if not isinstance(e, SentUnconfirmed)] or [error]
    if any(isinstance(e, TimeoutError) for e in chain):
        return "no confirm within the publish timeout (AVOCADO_PUBLISH_TIMEOUT_S)"
    return str(chain[0]) or type(chain[0]).__name__


def _producer() -> Producer:
    global _default
    with _default_lock:
        if _default is None:
            _default = Producer()
        return _default


def generate(prompt: str | None = None, **kwargs: Any) -> JobHandle[GenerateResult]:
    """Enqueue a generation with the process-wide producer (settings from the environment)."""
    return _producer().generate(prompt, **kwargs)


def summarize(
    share_id: str, content: str | Mapping[str, Any], **kwargs: Any
) -> JobHandle[SummarizeResult]:
    """Enqueue a summary with the process-wide producer (settings from the environment)."""
    return _producer().summarize(share_id, content, **kwargs)


def embed(input: str | Sequence[str], **kwargs: Any) -> JobHandle[EmbedResult]:
    """Enqueue an embedding with the process-wide producer (settings from the environment)."""
    return _producer().embed(input, **kwargs)
