"""Two kinds of failure that matter: worth retrying, or not."""

from __future__ import annotations

__all__ = ["InvalidPayload", "JobError", "JobTimedOut", "PermanentError", "TransientError"]


class JobError(Exception):
    """Base of every failure a job can end with."""


class TransientError(JobError):
    """The same job may well succeed later: retry with backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(JobError):
    """Retrying cannot help: fail now with a clear reason."""


class InvalidPayload(PermanentError):
    """The message does not follow its contract."""


class JobTimedOut(PermanentError):
    """The job ran past its soft time limit; running it again would likely overrun again."""
