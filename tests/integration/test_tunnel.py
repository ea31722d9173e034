"""A worker exposing its Ollama through an ngrok tunnel: pyngrok drives the fake agent from
``tests.fake_ngrok`` as it drives the real one, and the announced URL really works."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import httpx
import pytest
import redis

from avocado_shared import Producer
from avocado_shared.discovery import Announcement, EndpointEvent, EndpointWatcher
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.fake_ngrok import fake_ngrok_path
from tests.services import REDIS_URL, WorkerProcess, wait_for

WAIT = 30
TOKEN = f"ngrok-token-{uuid.uuid4().hex}"
PASSWORD = f"tunnel-pass-{uuid.uuid4().hex}"
NODE = {
    "AVOCADO_NODE_TTL_S": "6",
    "AVOCADO_NODE_REFRESH_S": "1",
    "AVOCADO_ANNOUNCE_INTERVAL_S": "2",
}


def _tunnel_node(
    worker_factory: WorkerFactory, sim: OllamaSimulator, sid: str, **env: str
) -> WorkerProcess:
    settings = {
        "AVOCADO_TUNNEL": "true",
        "AVOCADO_SERVICE_ID": sid,
        "AVOCADO_NGROK_PATH": fake_ngrok_path(),
        "AVOCADO_TUNNEL_PASSWORD": PASSWORD,
        "NGROK_AUTHTOKEN": TOKEN,
        **NODE,
        **env,
    }
    return worker_factory.process(sim.url, **settings)


def _agent_pids(sid: str) -> list[int]:
    """The ngrok agents started for node ``sid`` (its private config file is on argv)."""
    found = subprocess.run(
        ["pgrep", "-f", f"{sid}.yml"], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in found.stdout.split()]


def _announced(seen: list[Announcement], sid: str, event: EndpointEvent) -> list[str]:
    return [a.url for a in seen if a.service_id == sid and a.event is event]


def test_tunnel_is_announced_works_with_credentials_and_refuses_without(
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
) -> None:
    watcher, _ = events
    sid = f"tunnel-{uuid.uuid4().hex[:8]}"
    _tunnel_node(worker_factory, fresh_sim, sid)

    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
    endpoint = watcher.live()[sid]
    assert endpoint.url != fresh_sim.url
    assert endpoint.auth == "basic"
    fresh_sim.clear()

    allowed = httpx.get(
        f"{endpoint.url}/api/tags", auth=("avocado", PASSWORD), headers=endpoint.headers
    )
    refused = httpx.get(f"{endpoint.url}/api/tags", headers=endpoint.headers)

    assert allowed.status_code == 200
    assert [m["name"] for m in allowed.json()["models"]] == ["llama3.2:1b"]
    assert refused.status_code == 401
    # Through the tunnel (the worker's own rounds ask Ollama directly, without the header).
    reached = [r for r in fresh_sim.requests.to("/api/tags") if "X-Forwarded-For" in r.headers]
    assert len(reached) == 1  # the refused request never reached Ollama
    assert reached[0].headers.get("Host") == f"localhost:{fresh_sim.port}"


def test_killed_agent_gets_a_new_tunnel_announced_and_the_old_removed(
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
) -> None:
    watcher, seen = events
    sid = f"tunnel-{uuid.uuid4().hex[:8]}"
    node = _tunnel_node(worker_factory, fresh_sim, sid)
    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
    old = watcher.live()[sid].url
    [agent] = _agent_pids(sid)

    os.kill(agent, signal.SIGKILL)

    assert watcher.wait_until(lambda live: sid in live and live[sid].url != old, timeout=30)
    assert old in _announced(seen, sid, EndpointEvent.REMOVED)
    new = watcher.live()[sid].url
    assert httpx.get(f"{new}/api/version", auth=("avocado", PASSWORD)).status_code == 200
    assert len(_agent_pids(sid)) == 1
    assert node.process.poll() is None

    node.stop()
    assert watcher.wait_until(lambda _: new in _announced(seen, sid, EndpointEvent.REMOVED), WAIT)
    assert _agent_pids(sid) == []  # the clean stop took the agent with it


def test_no_secret_in_announcements_records_logs_or_argv(
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
    key_prefix: str,
) -> None:
    watcher, seen = events
    sid = f"tunnel-{uuid.uuid4().hex[:8]}"
    node = _tunnel_node(worker_factory, fresh_sim, sid)
    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
    argv = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    client = redis.Redis.from_url(REDIS_URL)
    records = b"".join(
        client.dump(key) or b"" for key in client.scan_iter(f"{key_prefix}node*")
    ).decode(errors="replace")
    node.stop()

    messages = "".join(a.model_dump_json() for a in seen)
    for secret in (TOKEN, PASSWORD):
        assert secret not in messages
        assert secret not in records
        assert secret not in node.log_text()
        assert secret not in argv
    assert sid in messages  # what was searched is really there
    assert sid in records


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"NGROK_AUTHTOKEN": ""}, "NGROK_AUTHTOKEN is not set"),
        ({"FAKE_NGROK_OFFLINE": "1"}, "no tunnel to port"),
    ],
)
def test_without_token_or_offline_the_worker_says_why_and_serves_jobs(
    producer: Producer,
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
    env: dict[str, str],
    reason: str,
) -> None:
    sid = f"tunnel-{uuid.uuid4().hex[:8]}"
    node = _tunnel_node(worker_factory, fresh_sim, sid, **env)

    wait_for(lambda: reason in node.log_text(), timeout=WAIT, what=f"the log to say {reason!r}")
    assert producer.generate("Still working?").get(timeout=WAIT).text
    assert node.process.poll() is None
