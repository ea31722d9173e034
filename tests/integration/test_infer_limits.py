"""avocado-infer's limits, on the real Redis and brokers: 429 with ``Retry-After`` over a
key's requests a minute or requests at once (slots held until the response ends, renewed while
it runs, freed by their lease when a gateway dies), 503 with ``Retry-After`` when the queue is
at AVOCADO_INFER_MAX_QUEUE or the broker blocks publishing."""

from __future__ import annotations

import json
import math
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from avocado_infer.limits import requests_key, slots_key
from avocado_shared import Producer, Settings
from avocado_shared.cancel import cancel_key
from avocado_shared.keys import KeyStore
from avocado_shared.routing import Lane
from avocado_shared.topology import declare_topology
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.infer_http import (
    ASK,
    CHAT,
    GENERATE,
    MODEL,
    STREAM,
    WAIT,
    Gateways,
    assert_ollama_error,
    assert_openai_error,
    auth,
    depth,
    redis_client,
    retry_after,
    unique,
)
from tests.processes import VENV_BIN, Child, spawn
from tests.rabbit import RabbitNode, alarm_raised, new_vhost
from tests.services import REDIS_URL, free_port, service_env, wait_for


@pytest.fixture
def slow_sim() -> Iterator[OllamaSimulator]:
    """Answers of 40 tokens at 20 a second: a stream stays open 2 s."""
    with OllamaSimulator(SimConfig(default_tokens=40, tokens_per_s=20)) as server:
        yield server


def test_a_key_over_its_requests_a_minute_gets_a_429_with_an_honest_retry_after(
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    sim: OllamaSimulator,
    key_prefix: str,
) -> None:
    worker_factory(sim.url)
    key, secret = keys.create(unique("rpm"), rpm=2)
    gateway = gateway_factory(require_keys=True)
    window = requests_key(key_prefix, key.name)
    with httpx.Client(base_url=gateway.url, timeout=WAIT, headers=auth(secret)) as client:
        served = [client.post(GENERATE[0], json=GENERATE[1]) for _ in range(2)]
        latest = _frees_in(window)
        over = client.post(GENERATE[0], json=GENERATE[1])
        earliest = _frees_in(window)
        over_openai = client.post(CHAT[0], json=CHAT[1])
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}])

    assert [a.status_code for a in served] == [200, 200]
    message = assert_ollama_error(over, 429)
    assert message == f"key {key.name!r} is over its 2 requests a minute"
    # When the first request leaves the 60 s window, as Redis's clock says, in whole seconds.
    assert math.ceil(earliest) <= retry_after(over) <= math.ceil(latest)
    assert_openai_error(over_openai, 429, "requests", "rate_limit_exceeded")
    assert 1 <= retry_after(over_openai) <= 60
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) <= 60
    print(
        f"rpm 2: third request 429, Retry-After {over.headers['Retry-After']} s "
        f"(the window frees in {earliest:.2f}-{latest:.2f} s); OpenAI shape 429, "
        f"Retry-After {over_openai.headers['Retry-After']} s"
    )


def _frees_in(window: str) -> float:
    """Seconds, by Redis's clock, until the oldest request of a full ``window`` leaves it."""
    client = redis_client()
    [(_, oldest)] = client.zrange(window, 0, 0, withscores=True)
    seconds, micros = client.time()
    return (oldest + 60_000 - (seconds * 1000 + micros / 1000)) / 1000


def _slot_ends(slots: str) -> list[float]:
    """The lease ends (ms, Redis's clock) of the slots held in ``slots``."""
    return [score for _, score in redis_client().zrange(slots, 0, -1, withscores=True)]


def _redis_ms() -> float:
    seconds, micros = redis_client().time()
    return seconds * 1000 + micros / 1000


def test_a_key_at_its_concurrency_gets_a_429_until_its_stream_ends(
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    slow_sim: OllamaSimulator,
    key_prefix: str,
) -> None:
    # 4 s of answer: it outlasts the 1 s lease by 3 s however late the first piece is read.
    slow_sim.config.default_tokens = 80
    worker_factory(slow_sim.url)
    key, secret = keys.create(unique("concurrency"), concurrency=1)
    gateway = gateway_factory(require_keys=True, slot_lease_s=1)
    slots = slots_key(key_prefix, key.name)
    with httpx.Client(base_url=gateway.url, timeout=WAIT, headers=auth(secret)) as client:
        with client.stream("POST", "/api/generate", json=STREAM) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert json.loads(next(lines))["done"] is False  # streaming, holding the slot
            [lease_end] = _slot_ends(slots)
            busy = client.post(GENERATE[0], json=GENERATE[1])
            # Past the first lease's end the slot is still held: its gateway renews it.
            wait_for(lambda: _redis_ms() > lease_end, timeout=WAIT, what="the first lease's end")
            renewed = _slot_ends(slots)
            still_busy = client.post(CHAT[0], json=CHAT[1])
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done"] is True
        # Released once the response has been sent, which the client may read first.
        wait_for(lambda: not _slot_ends(slots), timeout=WAIT, what="the slot's release")
        after = client.post(GENERATE[0], json=GENERATE[1])

    message = assert_ollama_error(busy, 429)
    assert message == f"key {key.name!r} has its 1 requests at once running"
    assert retry_after(busy) == 1
    assert len(renewed) == 1
    assert renewed[0] > lease_end
    assert_openai_error(still_busy, 429, "requests", "rate_limit_exceeded")
    assert retry_after(still_busy) == 1
    assert after.status_code == 200, after.text
    print(
        f"concurrency 1: second request 429, Retry-After {busy.headers['Retry-After']} s; "
        f"after the lease's end, renewed: 429, Retry-After {still_busy.headers['Retry-After']} "
        f"s; after the stream ended: {after.status_code}"
    )


def test_a_client_that_leaves_mid_stream_frees_its_slot(
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    slow_sim: OllamaSimulator,
    key_prefix: str,
) -> None:
    slow_sim.config.default_tokens = 1200  # a minute: still streaming whenever the test looks
    worker_factory(slow_sim.url)
    key, secret = keys.create(unique("leaves"), concurrency=1)
    gateway = gateway_factory(require_keys=True)  # a 30 s lease, renewed while held
    slots = slots_key(key_prefix, key.name)
    with httpx.Client(base_url=gateway.url, timeout=WAIT, headers=auth(secret)) as client:
        with client.stream("POST", "/api/generate", json=STREAM) as first:
            # Kept: a line iterator dropped here would close the connection (httpcore does
            # when the generator is collected), so the client would leave before the check.
            lines = first.iter_lines()
            assert json.loads(next(lines))["done"] is False
            assert len(_slot_ends(slots)) == 1
        # Gone after its first piece (the block closes the response): the gateway notices at
        # the next one and lets go.
        wait_for(lambda: not _slot_ends(slots), timeout=20, what="the slot's release")
        slow_sim.config.default_tokens = 40
        after = client.post(GENERATE[0], json=GENERATE[1])

    assert after.status_code == 200, after.text


def test_the_slots_of_a_gateway_that_dies_free_themselves(
    broker_url: str,
    key_prefix: str,
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    slow_sim: OllamaSimulator,
    tmp_path: Path,
) -> None:
    worker_factory(slow_sim.url)
    key, secret = keys.create(unique("orphan"), concurrency=1)
    slots = slots_key(key_prefix, key.name)
    # The survivor binds its port first: free_port's port is free only until something binds
    # one, and the survivor's could be it (seen: the "doomed" port served by the survivor).
    survivor = gateway_factory(require_keys=True)
    port = free_port()
    # The slot outlives the kill by two thirds of the lease at least (the last renewal may be
    # a third old): 4 s for the survivor's first request, an in-process call.
    env = service_env(
        broker_url, key_prefix, AVOCADO_INFER_PORT=str(port), AVOCADO_INFER_SLOT_LEASE_S="6"
    )
    log = tmp_path / "infer.log"
    doomed = Child(spawn([str(VENV_BIN / "avocado-infer")], log, env=env, cwd=tmp_path), log)
    try:
        wait_for(lambda: _answers(port, doomed), timeout=WAIT, what="avocado-infer")
        url = f"http://127.0.0.1:{port}/api/generate"
        with httpx.stream("POST", url, json=STREAM, headers=auth(secret), timeout=WAIT) as held:
            # Kept: a line iterator dropped after its first line closes the connection (httpcore
            # closes it when the generator is collected), and the gateway, seeing its client
            # leave before the SIGKILL lands, let its slot go (seen: 200 where 429 was due).
            lines = held.iter_lines()
            assert json.loads(next(lines))["done"] is False
            doomed.kill()  # SIGKILL: it never releases its slot
    finally:
        code = doomed.stop()
    with httpx.Client(base_url=survivor.url, timeout=WAIT, headers=auth(secret)) as client:
        busy = client.post(GENERATE[0], json=GENERATE[1])
        wait_for(lambda: not _slot_ends(slots), timeout=WAIT, what="the dead gateway's lease")
        after = client.post(GENERATE[0], json=GENERATE[1])

    assert code == -signal.SIGKILL
    assert busy.status_code == 429
    assert after.status_code == 200, after.text


def _answers(port: int, child: Child) -> bool:
    child.check_running("avocado-infer")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_a_queue_at_its_limit_is_a_503_with_retry_after(
    idle_vhost: str, key_prefix: str, gateway_factory: Gateways
) -> None:
    fleet = Settings(broker_url=idle_vhost, redis_url=REDIS_URL, key_prefix=key_prefix)
    with Producer(fleet) as producer:
        for n in range(2):
            producer.generate(f"Waiting {n}.", lane=Lane.INTERACTIVE)
    # No node takes them: the requests are held for one to come (a fleet that scales from zero).
    held = {"fleet": fleet, "stream_timeout_s": 1, "hold_unserved": True}
    full = gateway_factory(max_queue=2, busy_retry_after_s=7, **held)
    roomy = gateway_factory(max_queue=3, **held)
    with httpx.Client(timeout=WAIT) as client:
        refused = client.post(f"{full.url}{GENERATE[0]}", json=GENERATE[1])
        refused_openai = client.post(f"{full.url}{CHAT[0]}", json=CHAT[1])
        depth_then = depth(fleet)
        queued = client.post(f"{roomy.url}{GENERATE[0]}", json=GENERATE[1])

    message = assert_ollama_error(refused, 503)
    assert "2 interactive jobs for llama3.2:1b wait in the queue" in message
    assert "AVOCADO_INFER_MAX_QUEUE=2" in message
    assert retry_after(refused) == 7
    assert_openai_error(refused_openai, 503, "server_error", None)
    assert retry_after(refused_openai) == 7
    assert depth_then == 2  # neither was queued
    # Below its limit a gateway queues the job, which waits for a worker that never comes.
    assert queued.status_code == 504, queued.text
    assert depth(fleet) == 3
    print(f"queue of 2 at a limit of 2: 503 {message!r}, Retry-After 7 s")


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """A RabbitMQ 4 node of this module, whose alarms block publishers."""
    with RabbitNode.private(4, free_port()).running() as node:
        yield node


@pytest.fixture
def alarmed_vhost(node: RabbitNode) -> str:
    return new_vhost(node.broker())


def test_a_broker_that_blocks_publishing_is_a_503_with_retry_after(
    alarmed_vhost: str, node: RabbitNode, gateway_factory: Gateways
) -> None:
    prefix = f"avocado-test-{uuid.uuid4().hex[:8]}:"
    fleet = Settings(
        broker_url=alarmed_vhost, redis_url=REDIS_URL, key_prefix=prefix, publish_timeout_s=30
    )
    with Producer(fleet) as producer, producer.app.connection_for_write() as connection:
        declare_topology(connection, fleet)
    gateway = gateway_factory(fleet=fleet, busy_retry_after_s=7, hold_unserved=True)
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as client:
        assert client.get("/readyz").status_code == 200
        with alarm_raised(node, "memory") as reason:
            answers = [client.post(path, json=body) for path, body in (GENERATE, CHAT, GENERATE)]
    flags = [key.decode() for key in redis_client().scan_iter(cancel_key(prefix, "*"))]

    first, shaped, later = answers
    # The first job was sent, then the broker blocked: cancelled, as no one waits for it.
    [flag] = flags
    job_id = flag.removeprefix(cancel_key(prefix, ""))
    assert assert_ollama_error(first, 503) == (
        f"job {job_id} sent, then the broker blocked publishing ({reason}); "
        "it is cancelled: send the request again"
    )
    # The next ones are refused before anything is sent.
    assert f"the broker blocks publishing ({reason})" in assert_openai_error(
        shaped, 503, "server_error", None
    )
    assert f"not published: the broker blocks publishing ({reason})" in assert_ollama_error(
        later, 503
    )
    assert [retry_after(a) for a in answers] == [7, 7, 7]
    for answer in answers:
        print(f"blocked broker: {answer.status_code}, Retry-After 7 s: {answer.text}")
