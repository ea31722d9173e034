"""Jobs go where their model is: a fleet of unlike nodes runs every job on a node that serves
its model (no pull, no dead letter, no redelivery), a model no node serves waits durably for
one, and a node's consumption follows its server's models as they change."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from avocado_shared import JobStatus, Producer
from avocado_shared.fleet import WorkerRegistry
from avocado_shared.redis_clients import redis_client
from avocado_shared.routing import Lane, canonical_model, lane_queue_name
from avocado_shared.topology import DEAD_LETTER_QUEUE, declare_lane_queues, declare_topology
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.processes import wait_for
from tests.rabbit import purge, queue_depth

WAIT = 60
LLAMA, QWEN = "llama3.2:1b", "qwen2.5:0.5b"
# The model follower's round in the tests (tests.services): routing follows within one.
ROUND_S = 0.5


def _node_env(sim: OllamaSimulator, backend: str, pull: str, model: str) -> dict[str, str]:
    """A node whose server serves ``model``, as ``avocado-worker up --model`` makes one."""
    env = {"AVOCADO_ALLOW_PULL": pull, "AVOCADO_DEFAULT_MODEL": model}
    if backend == "openai":
        env |= {"AVOCADO_BACKEND": "openai", "AVOCADO_BACKEND_URL": f"{sim.url}/v1"}
    return env


def _consumers(producer: Producer, model: str) -> int:
    """Consumers of ``model``'s lane queues (declared first, with the exchanges they are
    bound to: a model no node ever served, in a vhost no job went to yet)."""
    with producer.app.connection_for_write() as connection:
        declare_topology(connection, producer.settings)
        declare_lane_queues(connection, model, producer.settings)
        channel = connection.default_channel
        return sum(
            int(channel.queue_declare(lane_queue_name(model, lane), passive=True).consumer_count)
            for lane in Lane
        )


@pytest.mark.parametrize(
    ("backend", "pull"),
    [("ollama", "false"), ("ollama", "true"), ("openai", "false")],
    ids=["ollama-no-pulls", "ollama-pulls", "openai"],
)
def test_each_job_runs_on_a_node_of_its_model(
    producer: Producer, worker_factory: WorkerFactory, backend: str, pull: str
) -> None:
    with producer.app.connection_for_write() as connection:
        declare_topology(connection, producer.settings)
    letters = queue_depth(producer, DEAD_LETTER_QUEUE)
    with (
        OllamaSimulator(SimConfig(models=[LLAMA])) as llama_sim,
        OllamaSimulator(SimConfig(models=[QWEN])) as qwen_sim,
    ):
        llama = worker_factory(llama_sim.url, **_node_env(llama_sim, backend, pull, LLAMA))
        qwen = worker_factory.process(qwen_sim.url, **_node_env(qwen_sim, backend, pull, QWEN))
        assert (_consumers(producer, QWEN), _consumers(producer, LLAMA)) == (2, 2)

        jobs = [producer.generate(f"Job {i}", model=QWEN) for i in range(20)]
        jobs += [producer.generate(f"Llama {i}", model=LLAMA) for i in range(5)]
        results = [job.get(timeout=WAIT) for job in jobs]

        on: dict[str, Any] = {QWEN: qwen_sim, LLAMA: llama_sim}
        # Of these models: with pulls allowed, an idle node may take on a model another test
        # of this session left jobs for (the fuzz test's), which is what pulls are for.
        pulls = [
            r
            for sim in on.values()
            for r in sim.requests
            if r.path == "/api/pull" and canonical_model(r.body["model"]) in on
        ]
        calls = {model: sim.generation_calls for model, sim in on.items()}
    assert [r.worker for r in results] == [qwen.name] * 20 + [llama.name] * 5
    assert not pulls
    assert calls == {QWEN: 20, LLAMA: 5}, "each job generated once: no redelivery"
    rows = [producer.results.get(job.id) for job in jobs]
    assert {(row.status, row.attempts) for row in rows if row is not None} == {
        (JobStatus.SUCCESS, 1)
    }
    assert queue_depth(producer, DEAD_LETTER_QUEUE) == letters


def test_a_job_for_a_model_no_node_serves_waits_for_one_that_joins(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    """``smollm2`` is the ``smollm2:latest`` a server lists: one model, one queue."""
    job = producer.generate("Hello", model="smollm2")
    assert queue_depth(producer, lane_queue_name("smollm2:latest", Lane.BATCH)) == 1
    assert job.state == "PENDING"
    with OllamaSimulator(SimConfig(models=["smollm2:latest"])) as sim:
        node = worker_factory(sim.url, AVOCADO_ALLOW_PULL="false")
        result = job.get(timeout=WAIT)
        asked = [r.body["model"] for r in sim.requests if r.path == "/api/generate"]
    assert result.worker == node.name
    assert asked == ["smollm2:latest"], "the server is asked for the model by its own name"


def test_the_routing_follows_a_node_that_joins_changes_its_models_and_leaves(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    """Within one round (the announce interval is 30 of them): joins, switches its model as
    a notebook does (``ollama stop llama3.2:1b; ollama run qwen2.5:0.5b``), stops serving
    one, leaves."""
    registry = WorkerRegistry(redis_client(producer.settings), producer.settings.key_prefix)
    within = 3 * ROUND_S
    with OllamaSimulator(SimConfig(models=[LLAMA])) as sim:
        assert _consumers(producer, LLAMA) == 0
        node = worker_factory(sim.url, AVOCADO_ALLOW_PULL="false")
        # Joined: its model's two lanes are consumed, and the fleet registry says so.
        assert _consumers(producer, LLAMA) == 2
        record = registry.get(node.name)
        assert record is not None
        assert record.models == [LLAMA]
        assert producer.generate("Here", model=LLAMA).get(timeout=WAIT).worker == node.name
        # The notebook switches: the server holds the other model in memory now.
        sim.config.models.append(QWEN)
        httpx.post(f"{sim.url}/api/generate", json={"model": LLAMA, "keep_alive": 0})
        httpx.post(f"{sim.url}/api/generate", json={"model": QWEN})
        wait_for(lambda: _consumers(producer, QWEN) == 2, timeout=within, what="qwen taken")
        assert _consumers(producer, LLAMA) == 0
        assert producer.generate("Now here", model=QWEN).get(timeout=WAIT).worker == node.name
        wait_for(
            lambda: (r := registry.get(node.name)) is not None and r.models == [QWEN],
            timeout=within,
            what="the record to follow",
        )
        # Its server stops serving qwen: no longer consumed; back to the model it was given.
        sim.config.models.remove(QWEN)
        wait_for(lambda: _consumers(producer, QWEN) == 0, timeout=within, what="qwen given up")
        assert _consumers(producer, LLAMA) == 2
        stranded = producer.generate("Nobody serves this now", model=QWEN)
        # It leaves: nothing is consumed, and it is gone from the registry at once.
        node.stop()
        assert (_consumers(producer, LLAMA), registry.get(node.name)) == (0, None)
    assert stranded.state == "PENDING"
    assert queue_depth(producer, lane_queue_name(QWEN, Lane.BATCH)) == 1
    purge(producer, lane_queue_name(QWEN, Lane.BATCH))
    registry.close()
