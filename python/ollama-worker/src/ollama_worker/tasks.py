"""The jobs: generate and summarize, each validated, run on the inference server, returned."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from pydantic import BaseModel
from redis.exceptions import RedisError

from avocado_shared.cancel import JobCancelled, is_cancelled
from avocado_shared.contracts import (
    GenerateRequest,
    GenerateResult,
    InvalidRequest,
    JobResult,
    SummarizeRequest,
    SummarizeResult,
    Usage,
    parse_result,
    validate_request,
)
from avocado_shared.locks import SingletonJob
from avocado_shared.store import JobStatus, StoreUnavailable
from avocado_shared.streams import StreamSnapshot, done_fields, error_fields
from avocado_shared.topology import GENERATE_TASK, SUMMARIZE_TASK
from ollama_worker.backends import Backend
from ollama_worker.deadletter import dead_letter_task
from ollama_worker.errors import InvalidPayload, JobTimedOut, PermanentError, TransientError
from ollama_worker.inference import ChunkSink, Completion, DeadlinePassed, ModelNotFound
from ollama_worker.once import AlreadyRunning, stored_success
from ollama_worker.resources import Resources, resources_of
from ollama_worker.results import node_name, record, record_quietly
from ollama_worker.resume import end_unended, open_stream, options_left
from ollama_worker.summary import summarize_text

__all__ = ["JobTask", "register"]

logger = logging.getLogger(__name__)
_Request = TypeVar("_Request", bound=BaseModel)
_T = TypeVar("_T")


def _log_pull(model: str) -> Callable[[dict[str, Any]], None]:
    last: dict[str, str] = {}

    def progress(chunk: dict[str, Any]) -> None:
        status = str(chunk.get("status", ""))
        if status != last.get("status"):
            logger.info("pulling %s: %s", model, status)
            last["status"] = status

    return progress


def ensure_model(resources: Resources, model: str) -> Backend:
    """This process's client, with ``model`` on this host: pulled when allowed (a backend
    that cannot pull raises ``ModelNotFound`` from ``pull`` at once)."""
    client = resources.backend()
    if model in resources.present_models:
        return client
    if not client.has_model(model):
        if client.can_pull:
            if not resources.settings.allow_pull:
                raise ModelNotFound(
                    f"model {model!r} is not on this host and pulling is disabled "
                    "(AVOCADO_ALLOW_PULL)"
                )
            logger.info("model %s is missing: pulling it", model)
        client.pull(model, progress=_log_pull(model))
    resources.present_models.add(model)
    return client


def _parse(task: JobTask, model: type[_Request], payload: Any) -> _Request:
    """Validate the payload; one that breaks its contract goes to the dead-letter queue."""
    try:
        return validate_request(model, payload)
    except InvalidRequest as error:
        dead_letter_task(task, f"invalid payload: {error}")
        raise InvalidPayload(str(error)) from None


class JobTask(SingletonJob):
    """Retries transient failures with backoff; permanent ones fail at once.

    As a ``SingletonJob`` it holds the job's lock until it succeeds or fails for good.
    """

    throws = (PermanentError,)
    acks_late = True
    reject_on_worker_lost = True

    @property
    def resources(self) -> Resources:
        """What the worker running this job holds."""
        return resources_of(self.app)

    def attempt(self, call: Callable[[], _T]) -> _T:
        """Run one attempt: a transient failure schedules a retry, an overrun fails for good.

        The soft time limit is enforced twice: by Celery in the prefork pool, and in every
        pool by the inference client's deadline, the only place a job waits for long.
        """
        try:
            with self.resources.backend().deadline(self.soft_time_limit):
                return call()
        except TransientError as error:
            self.retry_transient(error)
        except (SoftTimeLimitExceeded, DeadlinePassed):
            raise JobTimedOut(
                f"{self.name} ran past its soft time limit of {self.soft_time_limit}s"
            ) from None

    def retry_transient(
        self, error: TransientError, kwargs: dict[str, Any] | None = None
    ) -> NoReturn:
        """Schedule another try (with ``kwargs`` instead of the job's own), or give up once
        the retry budget is spent."""
        policy, retries = self.resources.retry, int(self.request.retries)
        if policy.exhausted(retries):
            logger.warning("%s[%s] gave up after %d retries", self.name, self.request.id, retries)
            raise error
        countdown = policy.countdown(retries, error.retry_after)
        logger.warning(
            "%s[%s] retry %d/%d in %ds: %s",
            self.name,
            self.request.id,
            retries + 1,
            policy.max_retries,
            countdown,
            error,
        )
        raise self.retry(
            kwargs=kwargs, exc=error, countdown=countdown, max_retries=policy.max_retries
        )

    def finish(self, result: JobResult | dict[str, Any]) -> dict[str, Any]:
        """Store the result durably, release the job's lock, then return the result.

        When the database cannot take the row, the job is retried with its result in the
        message (``finished``): the retry writes it, it does not run the model again.
        The lock goes before Celery publishes the result (it releases in ``on_success``,
        after), so a producer that resubmits the moment it sees the result runs it again.
        """
        done = result if isinstance(result, JobResult) else parse_result(result)
        data = done.model_dump(mode="json")
        try:
            record(self, str(self.request.id), JobStatus.SUCCESS, self.request.kwargs, result=done)
        except StoreUnavailable as error:
            kwargs = {**(self.request.kwargs or {}), "finished": data}
            self.retry_transient(TransientError(f"result not stored: {error}"), kwargs)
        released = self.release_lock(task_args=self.request.args, task_kwargs=self.request.kwargs)
        self.request.lock_release_pending = not released
        return data

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the job once per job id (``once``): a copy of a job that succeeded returns its
        stored result, a copy of one that is running comes back later."""
        job_id = str(self.request.id)
        try:
            resources = self.resources
            with resources.leases.hold(self.singleton_backend.redis, job_id):
                # Under the lease: a copy that finished just before cannot be missed.
                stored = stored_success(resources.store, job_id)
                if stored is not None:
                    logger.info("%s[%s] already succeeded: its result stands", self.name, job_id)
                    return stored
                if _cancelled(resources, job_id):
                    raise JobCancelled("cancelled on request before it ran")
                record_quietly(self, job_id, JobStatus.STARTED, kwargs)
                # Not Task.__call__: it would push a request without the job's id on top of
                # the one Celery's tracer pushed.
                return self.run(*args, **kwargs)
        except AlreadyRunning as running:
            logger.info("%s[%s]: %s", self.name, job_id, running)
            raise self.retry(exc=running, countdown=running.retry_in, max_retries=None) from None
        except (Retry, Ignore, Reject):
            raise
        except Exception as error:
            # Celery publishes the failure before it calls on_failure: a producer that
            # resubmits the moment it sees it must find the lock free and the row written.
            self._failed(error, job_id, kwargs)
            raise

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Release the lock again only if ``finish`` could not (Redis was down): the result
        is stored by now, so Redis is back. Otherwise nothing to do, one Redis round trip
        fewer per keyed job than celery-singleton's unconditional second release."""
        if getattr(self.request, "lock_release_pending", False):
            self.release_lock(task_args=args, task_kwargs=kwargs)

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo
    ) -> None:
        if not isinstance(exc, AlreadyRunning):  # the running copy's row says what it does
            record_quietly(self, task_id, JobStatus.RETRY, kwargs, _reason(exc))

    def _failed(self, error: BaseException, task_id: str, kwargs: Any) -> None:
        """Store why the job failed (or that it was cancelled), then let the next submission
        of it take the lock."""
        status = JobStatus.CANCELLED if isinstance(error, JobCancelled) else JobStatus.FAILURE
        record_quietly(self, task_id, status, kwargs, _reason(error))
        if self.name == GENERATE_TASK:  # its reader must not wait for an answer to come
            end_unended(self.resources, task_id, _reason(error))
        self.release_lock(task_args=self.request.args, task_kwargs=kwargs)
        self.request.failure_recorded = True

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo
    ) -> None:
        """A failure the job's own call did not see (it never started): record it now."""
        if not getattr(self.request, "failure_recorded", False):
            self._failed(exc, task_id, kwargs)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _cancelled(resources: Resources, job_id: str) -> bool:
    """Whether the job was cancelled before it ran; with Redis down it runs (the lease said
    the same: at least once beats never)."""
    try:
        return is_cancelled(resources.redis(), resources.settings.key_prefix, job_id)
    except RedisError as error:
        logger.warning("job %s: cancel flag not readable, the job runs: %s", job_id, error)
        return False


def _generate(
    resources: Resources,
    job: GenerateRequest,
    model: str,
    on_chunk: ChunkSink,
    streamed: StreamSnapshot,
) -> Completion:
    """Run the job on the server, each chunk to ``on_chunk``, continuing ``streamed.text``."""
    client = ensure_model(resources, model)
    options = options_left(job.options, streamed)
    if job.messages is None:
        assert job.prompt is not None
        return client.generate(
            model,
            job.prompt,
            system=job.system,
            options=options,
            format=job.format,
            keep_alive=job.keep_alive,
            on_chunk=on_chunk,
            partial=streamed.text,
        )
    messages = [m.model_dump(exclude_none=True) for m in job.messages]
    if job.system:
        messages.insert(0, {"role": "system", "content": job.system})
    return client.chat(
        model,
        messages,
        options=options,
        format=job.format,
        keep_alive=job.keep_alive,
        on_chunk=on_chunk,
        partial=streamed.text,
    )


def _summarize(resources: Resources, job: SummarizeRequest, model: str) -> tuple[Completion, int]:
    client = ensure_model(resources, model)
    return summarize_text(
        client,
        model,
        job.content.text,
        job.options,
        num_ctx=client.summary_context(model, resources.settings.summary_num_ctx),
        title=job.content.title,
    )


def _generated(task: JobTask, text: str, usage: Usage) -> GenerateResult:
    """The result of a generation of ``text`` that cost ``usage``."""
    return GenerateResult(
        job_id=str(task.request.id), text=text, worker=node_name(task), **usage.model_dump()
    )


def generate(
    self: JobTask, request: dict[str, Any], finished: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run a prompt or chat generation on the local inference server; ``finished``: its
    result, when only storing it is left to do."""
    if finished is not None:
        return self.finish(finished)
    job = _parse(self, GenerateRequest, request)
    model = job.model or self.resources.settings.default_model
    job_id = str(self.request.id)
    stream, streamed = open_stream(self.resources, job_id)
    if streamed.end is not None and streamed.end.usage is not None:
        stream.close()  # whole, but its worker died before storing it
        return self.finish(_generated(self, streamed.text, streamed.end.usage))
    try:
        done = self.attempt(lambda: _generate(self.resources, job, model, stream.append, streamed))
    except Retry:
        stream.close()  # the next attempt continues it
        raise
    except BaseException as error:
        stream.close(error_fields(_reason(error)))
        raise
    stream.close(done_fields(done.usage))
    return self.finish(_generated(self, done.text, done.usage))


def summarize(
    self: JobTask, request: dict[str, Any], finished: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Summarize one shared item, in parts when it is longer than the context; ``finished``:
    its result, when only storing it is left to do."""
    if finished is not None:
        return self.finish(finished)
    job = _parse(self, SummarizeRequest, request)
    model = job.options.model or self.resources.settings.default_model
    done, chunks = self.attempt(lambda: _summarize(self.resources, job, model))
    return self.finish(
        SummarizeResult(
            job_id=str(self.request.id),
            share_id=job.share_id,
            summary=done.text.strip(),
            chunks=chunks,
            worker=node_name(self),
            **done.usage.model_dump(),
        )
    )


def register(app: Celery) -> None:
    """Add the fleet's jobs to ``app``; not shared, so a producer's app in the same
    process keeps its own stubs of these names."""
    for run, name in ((generate, GENERATE_TASK), (summarize, SUMMARIZE_TASK)):
        app.task(name=name, base=JobTask, bind=True, shared=False)(run)
