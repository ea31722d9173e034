"""A node that knows when it will be stopped (a notebook's session limit) drains before it.

It takes jobs while one started now would end before its cutoff (less a margin), judged by
the longest of the jobs it ran lately; past that it takes no more, finishes what it runs and
leaves, so no job is cut by the cutoff and redelivered to start over elsewhere. The decision
is made every ``models_refresh_s``, so it looks that much ahead: a job that starts between two
decisions still ends in time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone

from ollama_worker.settings import WorkerSettings

__all__ = ["Cutoff"]

# How many of the latest job durations the estimate looks at.
_WINDOW = 20


class Cutoff:
    """When this node stops, and how long its jobs take."""

    def __init__(self, at: datetime, margin_s: float) -> None:
        self.at = at
        self.margin_s = margin_s
        self._durations: deque[float] = deque(maxlen=_WINDOW)
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Cutoff | None:
        """The cutoff the settings give (a time, or seconds from now); None without one."""
        at = settings.cutoff
        if at is None and settings.cutoff_after_s is not None:
            at = datetime.now(timezone.utc) + timedelta(seconds=settings.cutoff_after_s)
        if at is None:
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        return cls(at, settings.drain_margin_s)

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self._started[job_id] = time.monotonic()

    def job_ended(self, job_id: str) -> None:
        with self._lock:
            started = self._started.pop(job_id, None)
            if started is not None:
                self._durations.append(time.monotonic() - started)

    def expected_s(self) -> float:
        """How long a job may take here: the longest of the latest; 0 before the first."""
        with self._lock:
            return max(self._durations, default=0.0)

    def left_s(self, now: datetime | None = None) -> float:
        """Seconds until the node must be gone: its cutoff less the margin."""
        now = now or datetime.now(timezone.utc)
        return (self.at - now).total_seconds() - self.margin_s

    def should_drain(self, lookahead_s: float, now: datetime | None = None) -> bool:
        """True once a job started within ``lookahead_s`` might not end in time."""
        return self.left_s(now) - lookahead_s < self.expected_s()
