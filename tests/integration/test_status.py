"""``avocado status``: queues, workers, dead letters, endpoints and failures on one screen, and
what it says when a part of the fleet is down."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.connection import Connection

from avocado_shared import JobFailed, Producer, Settings
from avocado_shared.discovery import Endpoint
from avocado_shared.registry import NodeRegistry
from avocado_shared.routing import Lane, lane_queue_name
from avocado_shared.store import JobStatus
from avocado_shared.topology import (
    DEAD_LETTER_QUEUE,
    GENERATE_TASK,
)
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.dead_letters import put_dead_letter
from tests.services import free_port, run_cli, service_env, wait_for

WAIT = 60
# The entry queues, beat's, and the default model's lanes, which its node consumes.
JOB_QUEUES = (
    "ml.generate",
    "ml.summarize",
    "ml.embed",
    "infra.announce",
    *(lane_queue_name("llama3.2:1b", lane) for lane in Lane),
)


@pytest.fixture
def connection(producer: Producer) -> Iterator[Connection]:
    with producer.app.connection_for_write() as made:
        made.ensure_connection(max_retries=3)
        yield made


@pytest.fixture
def endpoint(settings: Settings) -> Iterator[Endpoint]:
    """A live record in the registry, as a node with a tunnel keeps one."""
    registry = NodeRegistry.from_settings(settings)
    record = Endpoint(
        service_id=f"status-{uuid.uuid4().hex[:8]}",
        url="https://status-test.example",
        auth="basic",
        models=["llama3.2:1b"],
        version="0.12.6",
        ttl_s=300,
    )
    registry.put(record)
    try:
        yield record
    finally:
        registry.remove(record.service_id)
        registry.close()


def _failed_job(producer: Producer, sim: OllamaSimulator) -> str:
    """A generation Ollama refuses (400), stored as FAILURE in ml_results; its id."""
    sim.config.fail_status, sim.config.fail_first = 400, 1
    try:
        handle = producer.generate("Refuse this one.")
        with pytest.raises(JobFailed, match="ollama refused the request"):
            handle.get(timeout=WAIT)
    finally:
        sim.config.fail_status, sim.config.fail_first = 503, 0

    def stored() -> bool:
        row = producer.results.get(handle.id)
        return row is not None and row.status is JobStatus.FAILURE

    wait_for(stored, what=f"the failure of {handle.id} in ml_results")
    return handle.id


def _line_with(text: str, *parts: str) -> str:
    """The one line of ``text`` that holds every part."""
    lines = [line for line in text.splitlines() if all(p in line for p in parts)]
    assert len(lines) == 1, f"no single line with {parts} in:\n{text}"
    return lines[0]


def test_status_shows_queues_workers_dead_letters_endpoints_and_failures(
    producer: Producer,
    connection: Connection,
    endpoint: Endpoint,
    fresh_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    broker_url: str,
    key_prefix: str,
) -> None:
    worker = worker_factory(fresh_sim.url, AVOCADO_METRICS_PORT="0")
    reason = f"invalid payload: status test {uuid.uuid4().hex[:6]}"
    letter_id = put_dead_letter(connection, reason)
    job_id = _failed_job(producer, fresh_sim)
    env = service_env(broker_url, key_prefix)

    shown = run_cli(env, "status")

    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for queue in JOB_QUEUES:
        assert re.search(rf"^  {re.escape(queue)} +\d+ +\d+ +1$", text, re.MULTILINE), text
    assert re.search(rf"^  {re.escape(DEAD_LETTER_QUEUE)} +\d+ +- +0$", text, re.MULTILINE)
    assert "workers: 1 online" in text
    worker_line = _line_with(text, worker.name, "running=")
    assert worker_line.endswith(f"queues={','.join(sorted(JOB_QUEUES))}")
    assert re.search(r" slots=2  models=llama3\.2:1b\*?  queues=", worker_line), worker_line
    assert "ml.dead-letter, newest" in text
    _line_with(text, letter_id, GENERATE_TASK, reason)
    _line_with(text, endpoint.service_id, endpoint.url, "llama3.2:1b")
    assert "OllamaRejected" in _line_with(text, job_id, "generate", worker.name)

    as_json = run_cli(env, "status", "--json")

    assert as_json.returncode == 0, as_json.stderr
    data: dict[str, Any] = json.loads(as_json.stdout)
    assert data["ok"] is True
    consumers = {q["name"]: q["consumers"] for q in data["queues"]["items"]}
    # Other models' lanes are listed too (jobs queued for them in this session): no node.
    assert {k: v for k, v in consumers.items() if v} == dict.fromkeys(JOB_QUEUES, 1)
    assert consumers[DEAD_LETTER_QUEUE] == 0
    assert all(q["unacked"] == 0 for q in data["queues"]["items"] if q["name"] in JOB_QUEUES)
    (seen,) = data["workers"]["items"]
    assert seen["name"] == worker.name
    assert set(seen["queues"]) == set(JOB_QUEUES)
    assert (seen["models"], seen["slots"], seen["draining"]) == (["llama3.2:1b"], 2, False)
    letters = data["dead_letters"]
    assert letters["count"] >= 1
    assert letters["items"][0]["id"] == letter_id, "newest first"
    assert letters["items"][0]["reason"] == reason
    assert letters["items"][0]["dead_lettered_by"] == "tests"
    assert [e["service_id"] for e in data["endpoints"]["items"]] == [endpoint.service_id]
    failure = next(f for f in data["failures"]["items"] if f["job_id"] == job_id)
    assert failure["task_type"] == "generate"
    assert "ollama refused the request" in failure["error"]


def test_status_says_which_part_is_down_and_shows_the_rest(
    endpoint: Endpoint,
    fresh_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    broker_url: str,
    key_prefix: str,
) -> None:
    worker = worker_factory(fresh_sim.url, AVOCADO_METRICS_PORT="0")
    no_redis = service_env(
        broker_url, key_prefix, AVOCADO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
    )

    shown = run_cli(no_redis, "status")
    as_json = run_cli(no_redis, "status", "--json")

    assert shown.returncode == as_json.returncode == 1
    assert re.search(r"^endpoints: UNAVAILABLE \(ConnectionError: .+\)$", shown.stdout, re.M)
    assert re.search(r"^  ml\.generate +\d+ +\d+ +1$", shown.stdout, re.MULTILINE)
    data = json.loads(as_json.stdout)
    assert data["ok"] is False
    assert data["endpoints"]["ok"] is False
    assert [w["name"] for w in data["workers"]["items"]] == [worker.name]
    assert all(data[part]["ok"] for part in ("queues", "workers", "dead_letters", "failures"))

    no_broker = service_env(f"amqp://guest:guest@127.0.0.1:{free_port()}//", key_prefix)
    shown = run_cli(no_broker, "status", timeout=30)

    assert shown.returncode == 1
    for title in ("queues", "workers", "dead letters"):
        assert f"{title}: UNAVAILABLE (broker unreachable: " in shown.stdout
    _line_with(shown.stdout, endpoint.service_id, endpoint.url)
    assert "recent failures (ml_results): " in shown.stdout
