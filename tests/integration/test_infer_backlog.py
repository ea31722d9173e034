"""The gateway's queue limit (``AVOCADO_INFER_MAX_QUEUE``) counts what really waits: a fleet
that keeps up is never refused, however many jobs the gateway published in the last second;
one that does not is refused once the broker itself counts the limit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from avocado_shared import Settings
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.infer_http import GENERATE, WAIT, Gateways, depth
from tests.services import REDIS_URL


def _burst(url: str, count: int, at_once: int) -> list[httpx.Response]:
    """``count`` generations, ``at_once`` of them at a time."""
    path, body = GENERATE
    with (
        httpx.Client(
            base_url=url, timeout=WAIT, limits=httpx.Limits(max_connections=at_once)
        ) as http,
        ThreadPoolExecutor(at_once) as pool,
    ):
        return list(pool.map(lambda _: http.post(path, json=body), range(count)))


def test_a_fleet_that_keeps_up_is_never_refused(
    sim: OllamaSimulator, worker_factory: WorkerFactory, gateway_factory: Gateways
) -> None:
    # Four slots: of 50 requests at once, at most 46 wait, under the limit; the gateway
    # publishes more than the limit's worth within each second.
    worker_factory(sim.url, concurrency=4)
    gateway = gateway_factory(max_queue=50)

    answers = _burst(gateway.url, count=400, at_once=50)

    refused = [a.json()["error"] for a in answers if a.status_code == 503]
    assert refused == []
    assert {a.status_code for a in answers} == {200}


def test_a_fleet_that_does_not_keep_up_is_refused_once_the_broker_counts_the_limit(
    idle_vhost: str, key_prefix: str, gateway_factory: Gateways
) -> None:
    fleet = Settings(broker_url=idle_vhost, redis_url=REDIS_URL, key_prefix=key_prefix)
    # No node takes the jobs (held for one to come, as a fleet that scales from zero does).
    gateway = gateway_factory(fleet=fleet, max_queue=10, stream_timeout_s=1, hold_unserved=True)

    answers = _burst(gateway.url, count=40, at_once=20)

    refused = [a.json()["error"] for a in answers if a.status_code == 503]
    assert refused, "a backlog past the limit is refused"
    counted = [int(message.split(" ", 1)[0]) for message in refused]
    assert min(counted) >= 10  # each refusal on the broker's count, at the limit or past it
    queued = [a for a in answers if a.status_code != 503]
    assert {a.status_code for a in queued} == {504}  # queued, no worker to answer
    assert depth(fleet) == len(queued) >= 10
