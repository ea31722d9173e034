"""Node registry and announcements on ``service-discovery``, with real workers and beat.

These nodes announce a fixed public URL (``AVOCADO_PUBLIC_URL``, here a simulator);
``test_tunnel.py`` does the same through an ngrok tunnel.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from kombu.connection import Connection

from avocado_shared.discovery import Announcement, EndpointEvent, EndpointWatcher
from avocado_shared.registry import NodeRegistry
from avocado_shared.settings import Settings
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.services import WorkerProcess, run_cli, service_env

WAIT = 30
# Small on purpose: expiry and re-announce happen within a test's patience.
INTERVAL_S = 2
NODE = {
    "AVOCADO_NODE_TTL_S": "4",
    "AVOCADO_NODE_REFRESH_S": "1",
    "AVOCADO_ANNOUNCE_INTERVAL_S": str(INTERVAL_S),
}


@pytest.fixture
def registry(settings: Settings) -> Iterator[NodeRegistry]:
    made = NodeRegistry.from_settings(settings)
    yield made
    made.close()


def _sid() -> str:
    return f"node-{uuid.uuid4().hex[:8]}"


def _node(
    worker_factory: WorkerFactory, sim: OllamaSimulator, sid: str, **env: str
) -> WorkerProcess:
    """A worker whose host announces ``sim`` as its public endpoint (``env``: other settings)."""
    return worker_factory.process(
        sim.url, AVOCADO_PUBLIC_URL=sim.url, AVOCADO_SERVICE_ID=sid, **{**NODE, **env}
    )


def _removed(seen: list[Announcement], sid: str) -> bool:
    return any(a.service_id == sid and a.event is EndpointEvent.REMOVED for a in seen)


def test_node_announces_its_endpoint_and_withdraws_on_clean_stop(
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
    registry: NodeRegistry,
) -> None:
    watcher, seen = events
    sid = _sid()
    node = _node(worker_factory, fresh_sim, sid)

    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
    endpoint = watcher.live()[sid]
    assert endpoint.url == fresh_sim.url
    assert endpoint.models == ["llama3.2:1b"]
    assert endpoint.version
    assert endpoint.headers == {"ngrok-skip-browser-warning": "true"}
    assert endpoint.ttl_s == 4
    record = registry.get(sid)
    assert record is not None
    assert record.url == fresh_sim.url
    first = next(a for a in seen if a.service_id == sid)
    assert first.event is EndpointEvent.CHANGED

    node.stop()

    assert watcher.wait_until(lambda _: _removed(seen, sid), timeout=WAIT)
    assert [a.event for a in seen if a.service_id == sid][-1] is EndpointEvent.REMOVED
    assert sid not in watcher.live()
    assert registry.get(sid) is None
    assert sid not in {e.service_id for e in registry.live()}


def test_sigkilled_node_expires_and_beat_announces_its_removal(
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
    registry: NodeRegistry,
) -> None:
    watcher, seen = events
    sid = _sid()
    worker_factory(fresh_sim.url)  # takes the announce jobs
    node = _node(worker_factory, fresh_sim, sid)
    worker_factory.beat(AVOCADO_ANNOUNCE_INTERVAL_S=str(INTERVAL_S))
    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)

    node.kill()

    assert watcher.wait_until(lambda _: _removed(seen, sid), timeout=WAIT)
    assert registry.get(sid) is None
    assert sid not in {e.service_id for e in registry.live()}
    assert registry.sweep_expired() == []  # announced once, by one sweeper


def test_two_nodes_listed_and_a_late_consumer_learns_both_within_one_interval(
    broker_url: str,
    key_prefix: str,
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
) -> None:
    early, _ = events
    ids = [_sid(), _sid()]
    with OllamaSimulator(SimConfig(models=["qwen2.5:0.5b"])) as other:
        for sid, sim in zip(ids, [fresh_sim, other], strict=True):
            # Both must be live at once before beat runs: a TTL that outlasts the start of
            # the second node however slowly it starts (expiry is the other tests' subject).
            _node(worker_factory, sim, sid, AVOCADO_NODE_TTL_S="60")
        assert early.wait_until(lambda live: set(ids) <= set(live), timeout=WAIT)

        listed = run_cli(service_env(broker_url, key_prefix), "endpoints", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["service_id"]: r for r in map(json.loads, listed.stdout.splitlines())}
        assert rows[ids[0]]["url"] == fresh_sim.url
        assert rows[ids[1]]["url"] == other.url
        assert rows[ids[1]]["models"] == ["qwen2.5:0.5b"]
        assert {rows[i]["event"] for i in ids} == {"live"}

        worker_factory.beat(AVOCADO_ANNOUNCE_INTERVAL_S=str(INTERVAL_S))
        with (
            Connection(broker_url) as connection,
            EndpointWatcher(connection) as late,
        ):
            # The nodes announced before this watcher existed; the next beat tells it.
            assert late.wait_until(lambda live: set(ids) <= set(live), timeout=INTERVAL_S + 3)
            assert late.live()[ids[1]].url == other.url


def test_node_on_an_openai_compatible_server_announces_that_backend_and_its_models(
    events: tuple[EndpointWatcher, list[Announcement]],
    worker_factory: WorkerFactory,
    fresh_sim: OllamaSimulator,
) -> None:
    watcher, _ = events
    sid = _sid()
    worker_factory(
        fresh_sim.url,
        AVOCADO_BACKEND="openai",
        AVOCADO_BACKEND_URL=f"{fresh_sim.url}/v1",
        AVOCADO_PUBLIC_URL=fresh_sim.url,
        AVOCADO_SERVICE_ID=sid,
        **NODE,
    )

    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
    endpoint = watcher.live()[sid]
    assert endpoint.backend == "openai"
    assert endpoint.models == ["llama3.2:1b"]
    assert endpoint.version is None
    assert fresh_sim.requests.to("/v1/models"), "checked and listed through /v1"
    assert not [r for r in fresh_sim.requests if r.path.startswith("/api/")], "no Ollama API"
