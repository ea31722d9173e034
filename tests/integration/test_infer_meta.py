"""avocado-infer's metadata routes through the real queue: a job's state from queued to done
(``GET /jobs/{id}``), the summary job over HTTP with its singleton semantics, ``/api/ps`` as
the official ``ollama`` client reads it; in-process gateways and workers on the simulator."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import ollama
import pytest
import redis

from avocado_shared import Producer, Settings
from avocado_shared.fleet import WorkerRecord, WorkerRegistry
from avocado_shared.routing import Lane
from avocado_shared.topology import describe
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.infer_http import generated, job_state
from tests.rabbit import lane_queue
from tests.services import REDIS_URL, wait_for

WAIT = 60
MODEL = "llama3.2:1b"
# Where the gateway's summaries of the default model wait.
SUMMARY_QUEUE = lane_queue(Lane.BATCH)
TEXT = "RabbitMQ quorum queues replicate messages with Raft."
# 20 tokens (max_words 10) at 10 a second: each summary runs for two seconds.
SHORT = {"max_words": 10}


@pytest.fixture
def paced_sim() -> Iterator[OllamaSimulator]:
    """A simulator of this test only, 10 tokens a second."""
    with OllamaSimulator(SimConfig(models=[MODEL], tokens_per_s=10)) as sim:
        yield sim


@pytest.fixture
def client(gateway_factory: Callable[..., InProcessGateway]) -> Iterator[httpx.Client]:
    """An HTTP client of a gateway of this test."""
    with httpx.Client(base_url=gateway_factory().url, timeout=WAIT) as made:
        yield made


def _share() -> str:
    return f"meta-{uuid.uuid4().hex[:10]}"


def _ready(producer: Producer, name: str) -> int:
    """The ready messages of a queue, as RabbitMQ counts them (declared first, as a fresh
    vhost has none)."""
    with producer.app.connection_for_write() as connection:
        infos = describe(connection, producer.settings, [MODEL])
    return next(info.messages for info in infos if info.name == name)


def _summarize(client: httpx.Client, share_id: str) -> dict[str, Any]:
    """Queue a summary of an item of its own (its text names it), two seconds long."""
    body = {"share_id": share_id, "content": {"text": f"{TEXT} ({share_id})"}, "options": SHORT}
    answer = client.post("/jobs/summarize", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/jobs/{answer.json()['id']}"
    posted: dict[str, Any] = answer.json()
    return posted


def test_a_summary_job_reads_queued_then_started_then_success(
    client: httpx.Client,
    producer: Producer,
    paced_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
) -> None:
    shares = [_share() for _ in range(3)]
    posted = [_summarize(client, share) for share in shares]  # no worker yet: all wait
    ids = [p["id"] for p in posted]
    ready = _ready(producer, SUMMARY_QUEUE)

    assert ready >= 3
    for job_id, share in zip(ids, shares, strict=True):
        assert job_state(client, job_id) == {
            "id": job_id,
            "kind": "summarize",
            "share_id": share,
            "state": "queued",
            "worker": None,
            "attempts": 0,
            "error": None,
            "updated_at": None,
            "queue": SUMMARY_QUEUE,
            "jobs_ahead_at_most": ready - 1,  # the ready messages besides its own
        }
    assert posted[0]["state"] == "queued"

    worker = worker_factory(paced_sim.url, concurrency=1)
    running = wait_for(
        lambda: (s := job_state(client, ids[0]))["state"] == "started" and s,
        timeout=WAIT,
        what="the first summary to start",
    )
    assert running["worker"] == worker.name
    assert running["attempts"] == 1
    assert running["queue"] is None
    assert running["jobs_ahead_at_most"] is None

    for job_id, share in zip(ids, shares, strict=True):
        done = wait_for(
            lambda s=share: (
                (a := client.get(f"/jobs/summarize/{s}").json())["state"] == "success" and a
            ),
            timeout=WAIT,
            what=f"summary of {share}",
        )
        result = producer.handle(job_id).get(timeout=WAIT)
        assert done["id"] == job_id
        assert done["worker"] == worker.name
        assert done["attempts"] == 1
        assert done["result"] == result.model_dump(mode="json")
        assert done["result"]["summary"]
        assert job_state(client, job_id) == {k: v for k, v in done.items() if k != "result"}


def test_a_second_summary_of_a_share_is_the_same_job(
    client: httpx.Client, paced_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    share = _share()
    first = _summarize(client, share)
    second = _summarize(client, share)  # the first is still queued: no worker yet

    assert second["id"] == first["id"]
    assert second["state"] == "queued"
    pending = client.get(f"/jobs/summarize/{share}").json()
    assert pending["id"] == first["id"]
    assert pending["state"] == "queued"
    assert pending["result"] is None

    worker_factory(paced_sim.url)
    done = wait_for(
        lambda: (a := client.get(f"/jobs/summarize/{share}").json())["state"] == "success" and a,
        timeout=WAIT,
        what="the summary",
    )
    assert done["id"] == first["id"]
    asked = [r for r in paced_sim.requests if share in str(r.body)]
    assert len(asked) == 1  # the simulator was asked once, for one job


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"content": {"text": TEXT}},
        {"share_id": "two words", "content": {"text": TEXT}},
        {"share_id": "SHARE", "content": {"text": "   "}},
        {"share_id": "SHARE", "content": TEXT},
        {"share_id": "SHARE", "content": {"text": TEXT}, "options": {"max_words": 5}},
        {"share_id": "SHARE", "content": {"text": TEXT}, "options": {"style": "haiku"}},
        {"share_id": "SHARE", "content": {"text": TEXT}, "priority": 1},
        "not an object",
    ],
)
def test_a_bad_summary_body_is_a_400_and_nothing_is_queued(
    client: httpx.Client, producer: Producer, body: Any
) -> None:
    share = _share()
    if isinstance(body, dict) and body.get("share_id") == "SHARE":
        body = {**body, "share_id": share}
    before = _ready(producer, SUMMARY_QUEUE)

    answer = client.post("/jobs/summarize", json=body)

    assert answer.status_code == 400, answer.text
    assert list(answer.json()) == ["error"]
    assert answer.json()["error"].startswith("invalid request: ")
    assert _ready(producer, SUMMARY_QUEUE) == before
    unknown = client.get(f"/jobs/summarize/{share}")
    assert unknown.status_code == 404
    assert list(unknown.json()) == ["error"]


def test_a_body_that_is_not_json_is_a_400(client: httpx.Client) -> None:
    answer = client.post(
        "/jobs/summarize", content=b'{"share_id": ', headers={"content-type": "application/json"}
    )

    assert answer.status_code == 400
    assert list(answer.json()) == ["error"]


def test_an_unknown_job_is_a_404_in_the_plain_shape(client: httpx.Client) -> None:
    job_id = str(uuid.uuid4())

    answer = client.get(f"/jobs/{job_id}")

    assert answer.status_code == 404
    assert list(answer.json()) == ["error"]
    assert f"job {job_id} is not known" in answer.json()["error"]


def test_a_retried_generation_reads_its_worker_and_attempts(
    client: httpx.Client, paced_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    worker = worker_factory(paced_sim.url)
    paced_sim.config.fail_first = 1  # 503: the first attempt is retried

    state = generated(
        client, {"model": MODEL, "prompt": TEXT, "stream": False, "options": {"num_predict": 5}}
    )

    assert state["kind"] == "generate"
    assert state["worker"] == worker.name
    assert state["attempts"] == 2
    assert paced_sim.generation_calls == 2


@pytest.fixture
def nodes(settings: Settings) -> Iterator[list[WorkerRecord]]:
    """Two live workers' records, as they keep them: both serve MODEL, one holds it in memory,
    the other holds qwen3 and drains."""
    registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), settings.key_prefix)
    now = datetime.now(timezone.utc)
    made = [
        WorkerRecord(worker="ps-a@node", models=["qwen3:0.6b", MODEL], loaded=["qwen3:0.6b"]),
        WorkerRecord(
            worker="ps-b@node",
            models=[MODEL],
            loaded=[MODEL],
            updated_at=now + timedelta(seconds=5),
            ttl_s=60,
            draining=True,
            cutoff=now + timedelta(minutes=10),
        ),
    ]
    for node in made:
        registry.put(node)
    yield made
    for node in made:
        registry.remove(node.worker)
    registry.close()


def test_ps_lists_the_loaded_models_and_their_nodes_for_the_ollama_client(
    gateway_factory: Callable[..., InProcessGateway], nodes: list[WorkerRecord]
) -> None:
    url = gateway_factory().url
    running = ollama.Client(host=url, timeout=WAIT).ps()
    raw = {m["model"]: m for m in httpx.get(f"{url}/api/ps", timeout=WAIT).json()["models"]}

    by_name = {m.model: m for m in running.models}
    assert sorted(by_name) == [MODEL, "qwen3:0.6b"]
    assert all(m.name == m.model for m in running.models)
    a, b = nodes
    # The node that vouches for a model longest.
    assert by_name[MODEL].expires_at == b.expires_at
    assert by_name["qwen3:0.6b"].expires_at == a.expires_at
    assert all(m.size == 0 and m.size_vram == 0 and m.digest == "" for m in running.models)
    view = raw[MODEL]["avocado"]
    assert [(n["worker"], n["loaded"], n["draining"]) for n in view["nodes"]] == [
        ("ps-a@node", False, False),
        ("ps-b@node", True, True),
    ]
    assert 500 < view["nodes"][1]["time_left_s"] <= 600
    assert set(view["backlog"]) == {"interactive", "batch"}
