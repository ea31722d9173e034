"""The producer API: validate a job, publish it with confirms, hand back a result handle."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from avocado_shared.celery_config import make_celery
from avocado_shared.contracts import (
    ChatMessage,
    GenerateRequest,
    GenerateResult,
    JobResult,
    SummarizeRequest,
    SummarizeResult,
    parse_result,
    validate_request,
)
from avocado_shared.locks import register_job_tasks
from avocado_shared.settings import Settings
from avocado_shared.store import ResultStore
from avocado_shared.tls import refuse_untrusted
from avocado_shared.topology import GENERATE_TASK, SUMMARIZE_TASK, declare_topology

__all__ = [
    "SENT_AT_HEADER",
    "JobFailed",
    "JobHandle",
    "Producer",
    "PublishError",
    "generate",
    "summarize",
]

# When the job was published (epoch seconds); workers measure its queue wait from it.
SENT_AT_HEADER = "x-avocado-sent-at"

_R = TypeVar("_R", bound=JobResult)


class JobFailed(RuntimeError):
    """The job ended in failure; ``reason`` is what the worker stored."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


class PublishError(ConnectionError):
    """The job was not published: the broker, or Redis that holds the job locks, is unreachable."""


class JobHandle(Generic[_R]):
    """A submitted job: its id, its state, and its result once there is one."""

    def __init__(self, result: AsyncResult) -> None:
        self._result = result

    @property
    def id(self) -> str:
        """The Celery task id, which ``avocado result`` takes."""
        return str(self._result.id)

    @property
    def state(self) -> str:
        """PENDING (queued or running), RETRY, SUCCESS or FAILURE; ``ml_results`` has STARTED."""
        return str(self._result.state)

    def ready(self) -> bool:
        """True once the job succeeded or failed for good."""
        return bool(self._result.ready())

    def get(self, timeout: float | None = None) -> _R:
        """Wait for the result; raises ``JobFailed`` or ``TimeoutError``."""
        try:
            data = self._result.get(timeout=timeout, propagate=True)
        except CeleryTimeoutError:
            raise TimeoutError(f"job {self.id} not finished after {timeout}s") from None
        except Exception as error:
            raise JobFailed(self.id, f"{type(error).__name__}: {error}") from error
        return cast(_R, parse_result(data))

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.state}>"


class Producer:
    """Publishes jobs onto the fleet's quorum queues; one per process is enough."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.app = make_celery("avocado-producer", self.settings)
        register_job_tasks(self.app)
        self._declared = False
        self._lock = threading.Lock()
        self._results: ResultStore | None = None

    @property
    def results(self) -> ResultStore:
        """``ml_results``, where workers store every job's outcome for good (Redis expires)."""
        with self._lock:
            if self._results is None:
                store = ResultStore.from_settings(self.settings)
                store.migrate()
                self._results = store
            return self._results

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | Mapping[str, Any]] | None = None,
        model: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        keep_alive: str | int | None = None,
        idempotency_key: str | None = None,
    ) -> JobHandle[GenerateResult]:
        """Enqueue a prompt or chat generation; raises ``InvalidRequest`` before publishing."""
        fields: dict[str, Any] = {
            "prompt": prompt,
            "messages": messages,
            "model": model,  # unset: the worker's AVOCADO_DEFAULT_MODEL, what its server serves
            "system": system,
            "options": dict(options or {}),
            "format": format,
            "keep_alive": keep_alive,
            "idempotency_key": idempotency_key,
        }
        request = validate_request(GenerateRequest, fields)
        return cast(JobHandle[GenerateResult], self.submit(request))

    def summarize(
        self,
        share_id: str,
        content: str | Mapping[str, Any],
        *,
        options: Mapping[str, Any] | None = None,
    ) -> JobHandle[SummarizeResult]:
        """Enqueue a summary; ``content`` is the text or a mapping with ``text``."""
        body = {"text": content} if isinstance(content, str) else dict(content)
        fields = {"share_id": share_id, "content": body, "options": dict(options or {})}
        request = validate_request(SummarizeRequest, fields)
        return cast(JobHandle[SummarizeResult], self.submit(request))

    def submit(self, request: GenerateRequest | SummarizeRequest) -> JobHandle[JobResult]:
        """Publish a validated request, persistent and confirmed; duplicates share one job.

        A summary with the same ``share_id``, or a generation with the same
        ``idempotency_key``, that is still queued or running is not published again.
        """
        task = GENERATE_TASK if isinstance(request, GenerateRequest) else SUMMARIZE_TASK
        try:
            self._ensure_topology()
            result = self.app.tasks[task].apply_async(
                kwargs={"request": request.model_dump(mode="json", exclude_none=True)},
                confirm_timeout=self.settings.publish_timeout_s,
                headers={SENT_AT_HEADER: time.time()},
                # The worker's limits apply: they are set for its hardware and consumer timeout.
                time_limit=None,
                soft_time_limit=None,
            )
        # RuntimeError: Celery's result consumer gave up reconnecting to the result backend.
        except (OperationalError, RedisError, OSError, RuntimeError) as error:
            raise PublishError(f"{task} not published: {error}") from error
        return JobHandle(result)

    def handle(self, job_id: str) -> JobHandle[JobResult]:
        """A handle for a job submitted earlier, by its id."""
        return JobHandle(AsyncResult(job_id, app=self.app))

    def close(self) -> None:
        """Release broker, backend and database connections."""
        self.app.close()
        if self._results is not None:
            self._results.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_topology(self) -> None:
        """Declare queues before the first publish, so no job goes to an unbound exchange."""
        if self._declared or not self.settings.declare_topology:
            return
        with self._lock:
            if not self._declared:
                with self.app.connection_for_write() as connection:
                    connection.ensure_connection(
                        max_retries=2, interval_start=0.2, errback=refuse_untrusted
                    )
                    declare_topology(connection, self.settings)
                self._declared = True


_default: Producer | None = None
_default_lock = threading.Lock()


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
