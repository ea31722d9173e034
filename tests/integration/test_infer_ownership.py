"""A job belongs to its key, through the real queue: key B gets the 404 of an unknown job for
key A's job from ``GET`` and ``DELETE /jobs/{id}`` and the summary route, and A's job runs on
untouched; an admin key (``avocado keys create --admin``) sees and cancels every job, those
the Python API queued included; a key made before admin keys existed is no admin."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from avocado_shared import Producer, Settings
from avocado_shared.keys import KeyStore
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.infer_http import (
    ASK,
    MODEL,
    WAIT,
    Gateways,
    auth,
    generated,
    job_state,
    redis_client,
    unique,
)
from tests.services import run_cli, service_env, wait_for

TEXT = "RabbitMQ quorum queues replicate messages with Raft."


@pytest.fixture
def callers(
    gateway_factory: Gateways,
    keys: KeyStore,
    broker_url: str,
    key_prefix: str,
    settings: Settings,
) -> Iterator[dict[str, httpx.Client]]:
    """Clients of one gateway that asks for keys: ``a`` and ``b``, ``admin`` (made by the
    ``avocado`` command with ``--admin``) and ``old`` (a key as made before admin keys, with no
    admin field)."""
    url = gateway_factory(require_keys=True).url
    secrets = {who: keys.create(unique(who))[1] for who in ("a", "b", "old")}
    made = run_cli(service_env(broker_url, key_prefix), "keys", "create", unique("root"), "--admin")
    assert made.returncode == 0, made.stderr
    assert "admin" in made.stderr
    secrets["admin"] = made.stdout.strip()
    digest = hashlib.sha256(secrets["old"].encode()).hexdigest()
    with redis_client() as client:
        assert client.hdel(f"{settings.key_prefix}apikey:{digest}", "admin") == 1
    clients = {
        who: httpx.Client(base_url=url, headers=auth(secret), timeout=WAIT)
        for who, secret in secrets.items()
    }
    yield clients
    for client in clients.values():
        client.close()


def _summarize(client: httpx.Client, share_id: str) -> str:
    body = {"share_id": share_id, "content": {"text": f"{TEXT} ({share_id})"}}
    answer = client.post("/jobs/summarize", json=body)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def test_another_keys_job_is_a_404_and_is_not_cancelled(
    callers: dict[str, httpx.Client], sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    a, b, admin, old = callers["a"], callers["b"], callers["admin"], callers["old"]
    share = f"own-{uuid.uuid4().hex[:10]}"
    job_id = _summarize(a, share)  # no worker yet: it waits in its queue
    stranger = str(uuid.uuid4())

    read = b.get(f"/jobs/{job_id}")
    cancel = b.delete(f"/jobs/{job_id}")
    summary = b.get(f"/jobs/summarize/{share}")
    by_old = old.get(f"/jobs/{job_id}")
    unknown = b.get(f"/jobs/{stranger}")
    unknown_summary = b.get("/jobs/summarize/no-such-share")

    for answer in (read, cancel, by_old):
        assert answer.status_code == 404, answer.text
        assert answer.text.replace(job_id, stranger) == unknown.text
    assert summary.status_code == 404
    assert summary.text.replace(share, "no-such-share") == unknown_summary.text
    print(f"key b asking for key a's job: 404 {read.json()}")
    assert job_state(a, job_id)["state"] == "queued"
    assert job_state(admin, job_id) == job_state(a, job_id)
    # Asking for the same share hands b a's queued job (the singleton): then it is b's too.
    assert _summarize(b, share) == job_id
    assert job_state(b, job_id)["state"] == "queued"
    assert old.get(f"/jobs/{job_id}").status_code == 404

    worker_factory(sim.url)
    done = wait_for(
        lambda: (s := a.get(f"/jobs/summarize/{share}").json())["state"] == "success" and s,
        timeout=WAIT,
        what="key a's summary",
    )

    assert done["id"] == job_id  # b's DELETE cancelled nothing
    assert done["result"]["summary"]
    assert admin.get(f"/jobs/summarize/{share}").json() == done
    assert b.get(f"/jobs/summarize/{share}").json() == done
    assert old.get(f"/jobs/summarize/{share}").status_code == 404


def test_a_generation_is_its_keys_and_an_admin_keys(
    callers: dict[str, httpx.Client], sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    a, b, admin = callers["a"], callers["b"], callers["admin"]
    worker_factory(sim.url)
    body = {"model": MODEL, "prompt": ASK, "stream": False, "options": {"num_predict": 5}}

    state = generated(a, body)
    job_id = state["id"]

    assert state["kind"] == "generate"
    assert job_state(admin, job_id) == state
    assert b.get(f"/jobs/{job_id}").status_code == 404
    assert b.delete(f"/jobs/{job_id}").status_code == 404
    assert a.delete(f"/jobs/{job_id}").status_code == 202


def test_a_job_the_python_api_queued_is_an_admin_keys_only(
    callers: dict[str, httpx.Client],
    producer: Producer,
    sim: OllamaSimulator,
    worker_factory: WorkerFactory,
) -> None:
    handle = producer.generate(ASK, model=MODEL)  # no worker yet: it waits
    path = f"/jobs/{handle.id}"
    a, admin = callers["a"], callers["admin"]

    assert a.delete(path).status_code == 404
    assert admin.delete(path).status_code == 202
    worker_factory(sim.url)  # takes it, sees it cancelled, writes its row
    cancelled = wait_for(
        lambda: (s := admin.get(path)).status_code == 200 and s.json(),
        timeout=WAIT,
        what="the job's row",
    )

    assert cancelled["state"] == "cancelled"
    assert a.get(path).status_code == 404  # known now, and still not a's


def test_avocado_keys_list_says_which_keys_are_admin_keys(
    broker_url: str, key_prefix: str, keys: KeyStore
) -> None:
    admin, plain = unique("root"), unique("app")
    keys.create(admin, admin=True)
    keys.create(plain)
    env = service_env(broker_url, key_prefix)

    listed = run_cli(env, "keys", "list")
    as_json = run_cli(env, "keys", "list", "--json")

    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert lines[admin].split("  created")[0].endswith(" lane=interactive admin")
    assert " admin" not in lines[plain]
    flags = {key["name"]: key["admin"] for key in json.loads(as_json.stdout)}
    assert (flags[admin], flags[plain]) == (True, False)
