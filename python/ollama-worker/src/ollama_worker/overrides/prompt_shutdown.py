"""A warm shutdown that begins when SIGTERM comes, not at the event loop's next timer.

Celery's SIGTERM handler only sets a flag, which the worker's event loop reads between two
polls; the poll the signal interrupted resumes with its old timeout, up to the next timer (a
second or more). A preempted notebook lost that much of its grace period before its worker
even stopped taking jobs. This consumer step gives the loop a socket to watch and writes to
it when Celery announces the shutdown, so the poll returns at once.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from celery import bootsteps
from celery.signals import worker_shutting_down
from celery.worker.consumer import Consumer

__all__ = ["PromptShutdown"]


class PromptShutdown(bootsteps.StartStopStep):  # type: ignore[misc]
    """Wakes the consumer's event loop when its worker begins to shut down."""

    def __init__(self, parent: Consumer, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._hostname = ""
        self._pair: tuple[socket.socket, socket.socket] | None = None

    def start(self, c: Consumer) -> None:
        if c.hub is None:  # no event loop (a green pool): nothing sleeps in a poll
            return
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._pair, self._hostname = (reader, writer), c.hostname
        c.hub.add_reader(reader, self._drain)
        worker_shutting_down.connect(self._wake, weak=False)

    def stop(self, c: Consumer) -> None:
        """Also run before each restart of the consumer (a lost connection resets its loop)."""
        if self._pair is None:
            return
        worker_shutting_down.disconnect(self._wake)
        c.hub.remove_reader(self._pair[0])
        for end in self._pair:
            end.close()
        self._pair = None

    shutdown = stop

    def _wake(self, sender: Any = None, **_: Any) -> None:
        """Runs inside Celery's signal handler: one byte, never blocking."""
        if sender == self._hostname and self._pair is not None:
            with contextlib.suppress(OSError):  # a byte already waiting wakes the loop too
                self._pair[1].send(b"\0")

    def _drain(self) -> None:
        if self._pair is not None:
            with contextlib.suppress(OSError):
                self._pair[0].recv(64)
