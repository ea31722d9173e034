"""The jobs: generate, summarize and embed, each validated, run on the inference server,
returned."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from avocado_shared.cancel import JobCancelled, cancel_key
from avocado_shared.contracts import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InvalidRequest,
    JobResult,
    SummarizeRequest,
    SummarizeResult,
    parse_result,
    validate_request,
)
from avocado_shared.store import JobStatus, StoreUnavailable
from avocado_shared.streams import StreamSnapshot, stream_key
from avocado_shared.topology import EMBED_TASK, GENERATE_TASK, SUMMARIZE_TASK
from ollama_worker.backends import Answer, Backend, pull_progress
from ollama_worker.deadletter import dead_letter_task
from ollama_worker.embedding import embed_texts
from ollama_worker.errors import InvalidPayload, JobTimedOut, PermanentError, TransientError
from ollama_worker.inference import Completion, DeadlinePassed, Embeddings, ModelNotFound
from ollama_worker.leases import AlreadyRunning
from ollama_worker.overrides.job_task import TracedJob
from ollama_worker.resources import Resources, resources_of
from ollama_worker.results import node_name, record, record_quietly, started, stored_success
from ollama_worker.summary import summarize_text
from ollama_worker.token_stream import TokenStream, failure_reason
from ollama_worker.tool_calls import honoured, linked_messages, tool_request
from ollama_worker.tracing import model_call, result_write_span

__all__ = ["JobTask", "register"]

logger = logging.getLogger(__name__)
_Request = TypeVar("_Request", bound=BaseModel)
_T = TypeVar("_T")


def ensure_model(resources: Resources, client: Backend, model: str) -> None:
    """Have ``model`` on this host: pulled when allowed (a backend that cannot pull raises
    ``ModelNotFound`` from ``pull`` at once)."""
    if model in resources.present_models:
        return
    if not client.has_model(model):
        if client.can_pull:
            if not resources.settings.allow_pull:
                raise ModelNotFound(
                    f"model {model!r} is not on this host and pulling is disabled "
                    "(AVOCADO_ALLOW_PULL)"
                )
            logger.info("model %s is missing: pulling it", model)
        client.pull(model, progress=pull_progress(model))
    resources.present_models.add(model)


def options_left(options: dict[str, Any], streamed: StreamSnapshot) -> dict[str, Any]:
    """A continued answer's ``num_predict`` less what was streamed (a chunk is a token on
    Ollama and llama.cpp, nearly always on vLLM), so the whole stays within the limit."""
    limit = options.get("num_predict")
    if not streamed.text or not isinstance(limit, int) or limit < 0:
        return options
    return {**options, "num_predict": max(1, limit - streamed.chunks)}


def _parse(task: JobTask, model: type[_Request], payload: Any) -> _Request:
    """Validate the payload; one that breaks its contract goes to the dead-letter queue."""
    try:
        return validate_request(model, payload)
    except InvalidRequest as error:
        dead_letter_task(task, f"invalid payload: {error}")
        raise InvalidPayload(str(error)) from None


class JobTask(TracedJob):
    """Runs once per job id; retries transient failures with backoff, permanent ones fail at
    once. It holds the job's lock (``SingletonJob``) until it succeeds or fails for good."""

    throws = (PermanentError,)
    acks_late = True
    reject_on_worker_lost = True
    # Celery's "succeeded" log line shows this much of the result (its default, 1024, makes
    # the line of a long answer or an embedding cost more than the rest of the log).
    resultrepr_maxsize = 120

    @property
    def resources(self) -> Resources:
        """What the worker running this job holds."""
        return resources_of(self.app)

    def run_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Under the job's lease: a copy of a job that succeeded returns its stored result, a
        copy of one that is running elsewhere comes back later, a cancelled one is refused.

        One Redis round trip takes the lease and reads the cancel flag and (for a reader's
        job) the token stream; one SQL statement counts the attempt and finds a copy of a job
        that succeeded already.
        """
        job_id = str(self.request.id)
        resources = self.resources
        prefix = resources.settings.key_prefix
        stream = stream_key(prefix, job_id) if self.name == GENERATE_TASK else None
        try:
            with resources.leases.hold(
                resources.redis(), job_id, cancel_key(prefix, job_id), stream
            ) as begun:
                # Under the lease: a copy that finished just before cannot be missed.
                if begun.cancelled:  # unless a copy of it succeeded: its result stands
                    stored = stored_success(resources.store, job_id)
                    if stored is None:
                        raise JobCancelled("cancelled on request before it ran")
                else:
                    stored = started(self, job_id, kwargs)
                if stored is not None:
                    logger.info("%s[%s] already succeeded: its result stands", self.name, job_id)
                    return stored
                self.job_run.stream = begun.stream
                return self.run(*args, **kwargs)
        except AlreadyRunning as running:
            logger.info("%s[%s]: %s", self.name, job_id, running)
            raise self.retry(exc=running, countdown=running.retry_in, max_retries=None) from None

    def attempt(self, call: Callable[[Backend], _T]) -> _T:
        """Run one attempt on this process's inference client: a transient failure schedules
        a retry, an overrun fails for good.

        The soft time limit is enforced twice: by Celery in the prefork pool, and in every
        pool by the inference client's deadline, the only place a job waits for long.
        """
        client = self.resources.backend()
        try:
            with client.deadline(self.soft_time_limit):
                return call(client)
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
        The lock goes before Celery publishes the result, so a producer that resubmits the
        moment it sees the result runs it again.
        """
        done = result if isinstance(result, JobResult) else parse_result(result)
        data = done.model_dump(mode="json")
        try:
            with result_write_span(str(self.request.id)):
                record(
                    self, str(self.request.id), JobStatus.SUCCESS, self.request.kwargs, result=done
                )
        except StoreUnavailable as error:
            kwargs = {**(self.request.kwargs or {}), "finished": data}
            self.retry_transient(TransientError(f"result not stored: {error}"), kwargs)
        released = self.release_lock(task_args=self.request.args, task_kwargs=self.request.kwargs)
        self.job_run.lock_release_pending = not released
        return data

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo
    ) -> None:
        if not isinstance(exc, AlreadyRunning):  # the running copy's row says what it does
            record_quietly(self, task_id, JobStatus.RETRY, kwargs, failure_reason(exc))

    def job_failed(self, error: BaseException, task_id: str, kwargs: Any) -> None:
        """Store why the job failed (or that it was cancelled), then let the next submission
        of it take the lock."""
        status = JobStatus.CANCELLED if isinstance(error, JobCancelled) else JobStatus.FAILURE
        reason = failure_reason(error)
        record_quietly(self, task_id, status, kwargs, reason)
        if self.name in _READ_TASKS:  # its reader must not wait for an answer to come
            self.resources.streams.end_if_open(task_id, error)
        self.release_lock(task_args=self.request.args, task_kwargs=kwargs)


# The jobs a reader (the gateway) may wait on through their stream.
_READ_TASKS = (GENERATE_TASK, EMBED_TASK)


def _generate(
    resources: Resources, client: Backend, job: GenerateRequest, model: str, stream: TokenStream
) -> Completion:
    """Run the job on the server, each chunk to ``stream``, continuing what it holds."""
    ensure_model(resources, client, model)
    streamed = stream.streamed
    operation = "text_completion" if job.messages is None else "chat"
    with model_call(client.provider, operation, model) as call:
        answer: Answer = {
            "options": options_left(job.options, streamed),
            "format": job.format,
            "keep_alive": job.keep_alive,
            "on_chunk": call.timed(stream.append),
            "partial": streamed.text,
        }
        if job.messages is None:
            assert job.prompt is not None
            done = client.generate(
                model, job.prompt, system=job.system, images=job.images, **answer
            )
        else:
            messages = linked_messages(job.messages)
            if job.system:
                messages.insert(0, {"role": "system", "content": job.system})
            done = honoured(job, client.chat(model, messages, **answer, **tool_request(job)))
        call.finished(done.usage)
    return done


def _summarize(
    resources: Resources, client: Backend, job: SummarizeRequest, model: str
) -> tuple[Completion, int]:
    ensure_model(resources, client, model)
    with model_call(client.provider, "chat", model) as call:
        done, chunks = summarize_text(
            client,
            model,
            job.content.text,
            job.options,
            num_ctx=client.summary_context(model, resources.settings.summary_num_ctx),
            title=job.content.title,
        )
        call.finished(done.usage)
    return done, chunks


def _generated(task: JobTask, done: Completion) -> GenerateResult:
    """The result of a generation."""
    return GenerateResult(
        job_id=str(task.request.id),
        text=done.text,
        tool_calls=list(done.tool_calls),
        worker=node_name(task),
        **done.usage.model_dump(),
    )


def generate(
    self: JobTask, request: dict[str, Any], finished: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run a prompt or chat generation on the local inference server; ``finished``: its
    result, when only storing it is left to do."""
    if finished is not None:
        return self.finish(finished)
    job = _parse(self, GenerateRequest, request)
    resources = self.resources
    model = resources.model_name(job.model)
    # An answer that may call tools starts over rather than continue: no server continues a
    # trailing assistant message into a tool call.
    job_id, read = str(self.request.id), self.job_run.stream
    with resources.streams.open(job_id, continuable=not job.tools, entries=read) as stream:
        done = stream.earlier_answer()
        if done is None:
            done = self.attempt(lambda client: _generate(resources, client, job, model, stream))
            stream.finish(done.usage, done.tool_calls)
    return self.finish(_generated(self, done))


def summarize(
    self: JobTask, request: dict[str, Any], finished: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Summarize one shared item, in parts when it is longer than the context; ``finished``:
    its result, when only storing it is left to do."""
    if finished is not None:
        return self.finish(finished)
    job = _parse(self, SummarizeRequest, request)
    resources = self.resources
    model = resources.model_name(job.options.model)
    done, chunks = self.attempt(lambda client: _summarize(resources, client, job, model))
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


def _embed(resources: Resources, client: Backend, job: EmbedRequest, model: str) -> Embeddings:
    ensure_model(resources, client, model)
    with model_call(client.provider, "embeddings", model) as call:
        done = embed_texts(client, model, job, resources.settings.embed_batch_size)
        call.finished(done.usage)
    return done


def _told(task: JobTask, result: JobResult | dict[str, Any]) -> dict[str, Any]:
    """Store the result (``finish``), then end the job's stream ``done``: a reader that waits
    there (the gateway; an embedding streams nothing else) finds the stored row at once."""
    done = result if isinstance(result, JobResult) else parse_result(result)
    with task.resources.streams.open(str(task.request.id)) as stream:
        data = task.finish(done)
        stream.finish(done.usage())
    return data


def embed(
    self: JobTask, request: dict[str, Any], finished: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Embed one text or a list, in batches the server takes; ``finished``: its result, when
    only storing it is left to do."""
    if finished is not None:
        return _told(self, finished)
    job = _parse(self, EmbedRequest, request)
    resources = self.resources
    model = resources.model_name(job.model or resources.settings.embed_model)
    done = self.attempt(lambda client: _embed(resources, client, job, model))
    result = EmbedResult(
        job_id=str(self.request.id),
        embeddings=done.vectors,
        share_id=job.share_id,
        worker=node_name(self),
        **done.usage.model_dump(),
    )
    return _told(self, result)


def register(app: Celery) -> None:
    """Add the fleet's jobs to ``app``; not shared, so a producer's app in the same
    process keeps its own stubs of these names."""
    jobs = ((generate, GENERATE_TASK), (summarize, SUMMARIZE_TASK), (embed, EMBED_TASK))
    for run, name in jobs:
        app.task(name=name, base=JobTask, bind=True, shared=False)(run)
