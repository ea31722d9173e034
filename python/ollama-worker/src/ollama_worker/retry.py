"""When a transient failure is tried again: one small policy beside Celery's ``retry``."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_retries`` retries, each after an exponential backoff with jitter of at
    most ``backoff_max_s``, and never sooner than the server's ``Retry-After``."""

    max_retries: int
    backoff_max_s: float

    def exhausted(self, retries: int) -> bool:
        """``retries`` retries were made already: the next failure is the last."""
        return retries >= self.max_retries

    def countdown(self, retries: int, retry_after: float | None = None) -> int:
        """Seconds until retry number ``retries + 1``.

        Whole seconds, at least one: native delayed delivery on quorum queues rejects a
        countdown that truncates to zero.
        """
        ceiling = min(self.backoff_max_s, 2.0 ** (retries + 1))
        delay = random.uniform(ceiling / 2, ceiling)
        return max(1, math.ceil(max(delay, retry_after or 0.0)))
