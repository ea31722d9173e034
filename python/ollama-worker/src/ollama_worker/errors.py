"""The worker's own failures, on the shared root: retrying helps (transient) or not."""

from __future__ import annotations

from avocado_shared.errors import AvocadoError, PermanentError, TransientError

__all__ = ["AvocadoError", "InvalidPayload", "JobTimedOut", "PermanentError", "TransientError"]


class InvalidPayload(PermanentError):
    """The message does not follow its contract."""


class JobTimedOut(PermanentError):
    """The job ran past its soft time limit; running it again would likely overrun again."""
