"""A fleet job as Celery's tracer and celery-singleton run it.

- Celery 5.7's tracer calls a task's own ``__call__`` in place of ``run``, under the request
  it pushed; ``Task.__call__`` would push a second request, without the job's id, on top.
- celery-singleton 0.3.1 keeps one lock store per process (the first app's, never closed) and
  releases the job's lock in ``on_success`` and ``on_failure``, after Celery published the
  outcome: a producer that resubmits the moment it sees it would find the lock still held.
  Here the lock store is the worker's (``Resources.lock_store``), the job releases its lock
  and records a failure itself before Celery publishes, and the hooks only do what it could
  not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.exceptions import Ignore, Reject, Retry

from avocado_shared.overrides.singleton import SingletonJob
from ollama_worker.resources import resources_of
from ollama_worker.tracing import job_span

__all__ = ["JobRun", "TracedJob"]


@dataclass
class JobRun:
    """What a job's run leaves for Celery's hooks, which get nothing from it but its request."""

    lock_release_pending: bool = False
    failure_recorded: bool = False
    # The job's token stream as it was read with its lease (``Begun.stream``), for its body.
    stream: list[Any] | None = None


class TracedJob(SingletonJob):
    """A job task whose body is ``run_job`` and whose failures ``job_failed`` records."""

    abstract = True

    @property
    def singleton_backend(self) -> Any:
        return resources_of(self.app).lock_store()

    @property
    def job_run(self) -> JobRun:
        """The running job's record, on the request Celery hands its hooks."""
        run = getattr(self.request, "job_run", None)
        if not isinstance(run, JobRun):
            run = self.request.job_run = JobRun()
        return run

    def run_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def job_failed(self, error: BaseException, task_id: str, kwargs: Any) -> None:
        """Store why the job failed and free its lock."""
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = self.job_run
        with job_span(self.name, self.request) as span:
            try:
                return self.run_job(args, kwargs)
            except (Retry, Ignore, Reject) as control:
                span.set_attribute("avocado.outcome", type(control).__name__.lower())
                raise
            except Exception as error:
                # Celery publishes the failure before it calls on_failure: a producer that
                # resubmits the moment it sees it must find the lock free and the row written.
                self.job_failed(error, str(self.request.id), kwargs)
                run.failure_recorded = True
                raise

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Release the lock again only if the job could not (Redis was down): the result is
        stored by now, so Redis is back. Otherwise nothing to do, one Redis round trip fewer
        per keyed job than celery-singleton's unconditional second release."""
        if self.job_run.lock_release_pending:
            self.release_lock(task_args=args, task_kwargs=kwargs)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo
    ) -> None:
        """A failure the job's own run did not see (it never started): record it now."""
        run = getattr(self.request, "job_run", None)
        if not (isinstance(run, JobRun) and run.failure_recorded):
            self.job_failed(exc, task_id, kwargs)
