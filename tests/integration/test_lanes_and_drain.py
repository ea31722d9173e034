"""Interactive work goes first, and a node drains before its cutoff.

An interactive job published behind a backlog of batch jobs starts in the next slot that
frees; a node told its cutoff takes no job it could not finish by then, finishes what it runs
and leaves before it, with nothing cut."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from avocado_shared import JobStatus, Producer
from avocado_shared.fleet import WorkerRegistry
from avocado_shared.redis_clients import redis_client
from avocado_shared.routing import Lane
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.processes import wait_for
from tests.rabbit import lane_queue, purge

WAIT = 60


def _prompts(sim: OllamaSimulator) -> list[str]:
    """The prompts the server was asked to answer, in the order it was asked."""
    return [
        str(r.body.get("prompt"))
        for r in sim.requests
        if r.path == "/api/generate" and isinstance(r.body, dict)
    ]


def test_an_interactive_job_starts_in_the_next_free_slot_ahead_of_the_batch_backlog(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    with OllamaSimulator(SimConfig(latency_ms=300)) as sim:
        worker_factory(sim.url, concurrency=1)
        batch = [producer.generate(f"Batch {i}") for i in range(8)]
        assert sim.wait_in_flight(1, timeout=WAIT)  # the first batch job holds the slot
        urgent = producer.generate("Interactive", lane=Lane.INTERACTIVE)
        urgent.get(timeout=WAIT)
        for job in batch:
            job.get(timeout=WAIT)
        prompts = _prompts(sim)
    # Behind the one running when it came, and ahead of the seven still queued.
    assert prompts.index("Interactive") == 1, prompts


def test_a_node_drains_before_its_cutoff_and_leaves_with_nothing_cut(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    """Cutoff 20 s after start, 5 s margin (a warm shutdown takes its time on a loaded
    machine), 3 s jobs, one at a time: it takes jobs while one would end by 15 s, then none,
    and is gone before 20 s."""
    registry = WorkerRegistry(redis_client(producer.settings), producer.settings.key_prefix)
    with OllamaSimulator(SimConfig(latency_ms=3000)) as sim:
        node = worker_factory.process(
            sim.url,
            concurrency=1,
            AVOCADO_CUTOFF_AFTER_S="20",
            AVOCADO_DRAIN_MARGIN_S="5",
            AVOCADO_MODELS_REFRESH_S="0.5",
        )
        started = time.monotonic()
        record = wait_for(lambda: registry.get(node.name), timeout=WAIT, what="its record")
        assert record.cutoff is not None
        jobs = [producer.generate(f"Drain {i}") for i in range(8)]
        wait_for(
            lambda: (r := registry.get(node.name)) is not None and r.draining,
            timeout=WAIT,
            what="the node to drain",
        )
        wait_for(lambda: not node.alive(), timeout=WAIT, what="the node to leave")
        gone_after = time.monotonic() - started
        gone_at = datetime.now(timezone.utc)
        cut = sim.abandoned
    done = [job for job in jobs if job.ready()]
    rows = [producer.results.get(job.id) for job in done]
    assert gone_at < record.cutoff, f"left {gone_after:.1f} s after it started"
    assert cut == 0, "an answer was cut off"
    assert 2 <= len(done) < len(jobs)
    assert {(row.status, row.attempts) for row in rows if row is not None} == {
        (JobStatus.SUCCESS, 1)
    }
    assert "drains" in node.log_text()
    assert registry.get(node.name) is None  # it left the fleet registry
    purge(producer, lane_queue(Lane.BATCH))
    registry.close()
