"""The one root of every error this project raises on purpose, in two branches.

A caller (a task deciding whether to retry, the CLI choosing its exit code, the gateway
choosing an HTTP status) asks one question of any failure: can the same thing succeed later
(``TransientError``) or not (``PermanentError``)? Each class carries the exit code the
``avocado`` command ends with, so the CLI catches ``AvocadoError`` once: 1 a permanent
failure, 2 a request that breaks its contract, 3 a job that failed, 4 not found, 69 a
service unreachable (nothing done), 75 an outcome unknown or worth retrying, 124 a result
not ready in time.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["AvocadoError", "NotFound", "PermanentError", "TransientError", "Unavailable"]


class AvocadoError(Exception):
    """Base of every failure the fleet's code raises on purpose."""

    exit_code: ClassVar[int] = 1


class TransientError(AvocadoError):
    """The same call may well succeed later: retry with backoff, never sooner than
    ``retry_after`` seconds when the other side said so."""

    exit_code: ClassVar[int] = 75  # EX_TEMPFAIL

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TransientError):
    """A service the call needs (the broker, Redis, the database) cannot be reached or
    refused the connection; nothing was done."""

    exit_code: ClassVar[int] = 69  # EX_UNAVAILABLE


class PermanentError(AvocadoError):
    """Retrying cannot help: fail now with a clear reason."""

    exit_code: ClassVar[int] = 1


class NotFound(PermanentError):
    """The job, letter or record asked for does not exist."""

    exit_code: ClassVar[int] = 4
