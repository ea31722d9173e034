"""What a caller holds and learns about a job it sent: its handle, and the errors of
sending it and of waiting for it."""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar, cast

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from avocado_shared.contracts import JobResult, parse_result
from avocado_shared.errors import PermanentError, TransientError, Unavailable

__all__ = ["JobFailed", "JobHandle", "NotFinished", "PublishError", "PublishOutcomeUnknown"]

_R = TypeVar("_R", bound=JobResult)


class JobFailed(PermanentError):
    """The job ended in failure; ``reason`` is what the worker stored."""

    exit_code: ClassVar[int] = 3

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


class NotFinished(TransientError, TimeoutError):
    """The job has not finished within the time the caller waited; it may still."""

    exit_code: ClassVar[int] = 124  # as timeout(1)


class PublishError(Unavailable, ConnectionError):
    """The job was not published: the broker refused it or blocks publishing, or it or Redis,
    which holds the job locks, is unreachable. Nothing was queued."""


class PublishOutcomeUnknown(PublishError):
    """The job was sent but not confirmed: the broker blocked publishing, the confirm did not
    come within ``publish_timeout_s``, or the connection dropped. It may be queued once, and
    was not sent again. Submit it again with the same ``share_id`` or ``idempotency_key``:
    that publishes it under the same ``job_id``, which workers run once."""

    exit_code: ClassVar[int] = 75  # EX_TEMPFAIL

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


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
        """Wait for the result; raises ``JobFailed`` or ``NotFinished``."""
        try:
            data = self._result.get(timeout=timeout, propagate=True)
        except CeleryTimeoutError:
            raise NotFinished(f"job {self.id} not finished after {timeout}s") from None
        except Exception as error:
            raise JobFailed(self.id, f"{type(error).__name__}: {error}") from error
        return cast(_R, parse_result(data))

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.state}>"
