"""A worker's event loop wakes when its shutdown begins, instead of finishing the poll the
signal interrupted (up to its next timer)."""

from __future__ import annotations

from types import SimpleNamespace

from celery.signals import worker_shutting_down
from kombu.asynchronous import Hub

from ollama_worker.overrides.prompt_shutdown import PromptShutdown


def _ready(hub: Hub) -> set[int]:
    """The descriptors the loop's next poll would return at once."""
    return {fd for fd, _event in hub.poller.poll(0) or ()}


def _shutting_down(hostname: str) -> None:
    """What Celery's SIGTERM handler announces, in the worker's main process."""
    worker_shutting_down.send(sender=hostname, sig="SIGTERM", how="Warm", exitcode=0)


def test_the_shutdown_of_its_own_worker_wakes_the_event_loop() -> None:
    hub = Hub()
    consumer = SimpleNamespace(hub=hub, hostname="w1@host")
    step = PromptShutdown(consumer)
    step.start(consumer)
    try:
        [watched] = hub.readers
        _shutting_down("w2@host")  # another worker of the process (as in the tests)
        assert watched not in _ready(hub)

        _shutting_down("w1@host")
        assert watched in _ready(hub)
        callback, args = hub.readers[watched]
        callback(*args)  # what the loop calls: it drains the wake-up
        assert watched not in _ready(hub)
    finally:
        step.stop(consumer)
    assert not hub.readers, "a consumer's restart leaves no socket behind"
    _shutting_down("w1@host")  # a stopped step no longer listens (nothing left to write to)
