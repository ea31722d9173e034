"""avocado-infer's API keys and limits, on the real Redis and brokers: 401 without a live key
(in each API's shape), 429 with ``Retry-After`` over a key's requests a minute or requests at
once, 503 with ``Retry-After`` when the queue is full or the broker blocks publishing; keys
made, listed and revoked with the ``avocado`` command; no secret in any log."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import redis

from avocado_infer.limits import requests_key, slots_key
from avocado_shared import Producer, Settings
from avocado_shared.cancel import cancel_key
from avocado_shared.errors import NotFound
from avocado_shared.keys import KeyStore
from avocado_shared.topology import GENERATE_QUEUE, declare_topology
from ollama_worker.testing import OllamaSimulator, SimConfig
from ollama_worker.testing.processes import VENV_BIN, Child, spawn
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.rabbit import Broker, RabbitNode, alarm_raised, isolated_vhost
from tests.services import REDIS_URL, free_port, run_cli, service_env, wait_for

WAIT = 60
MODEL = "llama3.2:1b"
ASK = "Tell me about avocados."
GENERATE = ("/api/generate", {"model": MODEL, "prompt": ASK, "stream": False})
CHAT = ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ASK}]})
STREAM = {"model": MODEL, "prompt": ASK}  # /api/generate streams by default

Gateways = Callable[..., InProcessGateway]


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def _depth(fleet: Settings) -> int:
    with Producer(fleet) as producer, producer.app.connection_for_write() as connection:
        declare_topology(connection, fleet)
        declared = connection.default_channel.queue_declare(GENERATE_QUEUE, passive=True)
        return int(declared.message_count)


def _assert_ollama_error(answer: httpx.Response, status: int) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    return body["error"]


def _assert_openai_error(answer: httpx.Response, status: int, kind: str, code: str | None) -> str:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (kind, None, code)
    message: str = error["message"]
    return message


def _retry_after(answer: httpx.Response) -> int:
    value = answer.headers["Retry-After"]
    assert value.isdigit(), value  # whole seconds
    return int(value)


@pytest.fixture
def keys(settings: Settings) -> Iterator[KeyStore]:
    with KeyStore.from_settings(settings) as store:
        yield store


@pytest.fixture
def slow_sim() -> Iterator[OllamaSimulator]:
    """Answers of 40 tokens at 20 a second: a stream stays open 2 s."""
    with OllamaSimulator(SimConfig(default_tokens=40, tokens_per_s=20)) as server:
        yield server


def test_no_key_a_wrong_key_or_a_revoked_key_is_a_401_in_each_apis_shape(
    gateway_factory: Gateways, keys: KeyStore, settings: Settings
) -> None:
    gateway = gateway_factory(require_keys=True)
    key, secret = keys.create(_name("revoked"))
    queued = _depth(settings)
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as client:
        assert client.get("/api/tags", headers=_auth(secret)).status_code == 200
        assert client.get("/v1/models", headers=_auth(secret)).status_code == 200
        wrong = "avk_" + "w" * 43
        live = {
            "no key": {},
            "a wrong key": _auth(wrong),
            "a Basic login": {"Authorization": "Basic eDp5"},
        }
        answers = {what: _refusals(client, headers) for what, headers in live.items()}
        keys.revoke(key.name)
        answers["a revoked key"] = _refusals(client, _auth(secret))
        open_routes = [client.get(path).status_code for path in ("/healthz", "/readyz")]

    for what, (plain, shaped) in answers.items():
        for answer in plain:
            message = _assert_ollama_error(answer, 401)
            assert answer.headers["WWW-Authenticate"] == "Bearer"
            assert secret not in answer.text
            assert wrong not in answer.text
        for answer in shaped:
            message = _assert_openai_error(answer, 401, "invalid_request_error", "invalid_api_key")
            assert answer.headers["WWW-Authenticate"] == "Bearer"
        print(f"{what}: 401 {message!r}")
    assert open_routes == [200, 200]
    assert _depth(settings) == queued  # nothing was queued

    # The clients no one here wrote see the 401 as theirs.
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk.models.list()
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        ollama.Client(host=gateway.url, headers=_auth(secret)).generate(model=MODEL, prompt=ASK)
    assert ollama_refused.value.status_code == 401


def _refusals(
    client: httpx.Client, headers: dict[str, str]
) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Every kind of route of the APIs asked with ``headers``: Ollama's and the fleet's own
    (plain errors), then OpenAI's."""
    plain = [
        client.post(GENERATE[0], json=GENERATE[1], headers=headers),
        client.post("/api/chat", json={"model": MODEL, "messages": []}, headers=headers),
        client.get("/api/tags", headers=headers),
        client.delete(f"/jobs/{uuid.uuid4()}", headers=headers),
    ]
    shaped = [
        client.post(CHAT[0], json=CHAT[1], headers=headers),
        client.get("/v1/models", headers=headers),
    ]
    return plain, shaped


def _stored(key_prefix: str) -> bytes:
    """Every name and value Redis holds about API keys under ``key_prefix``."""
    client = _redis()
    held = b""
    for name in client.scan_iter(f"{key_prefix}apikey*"):
        held += name + b"".join(k + v for k, v in client.hgetall(name).items())
    return held


def test_the_avocado_command_makes_lists_and_revokes_a_key(
    broker_url: str, key_prefix: str, gateway_factory: Gateways
) -> None:
    env = service_env(broker_url, key_prefix)
    name = _name("cli")
    made = run_cli(env, "keys", "create", name, "--rpm", "30", "--concurrency", "2")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    listed = run_cli(env, "keys", "list")
    as_json = run_cli(env, "keys", "list", "--json")
    held = _stored(key_prefix)
    again = run_cli(env, "keys", "create", name)
    gateway = gateway_factory(require_keys=True)
    served = httpx.get(f"{gateway.url}/v1/models", headers=_auth(secret), timeout=WAIT)
    revoked = run_cli(env, "keys", "revoke", name)
    refused = httpx.get(f"{gateway.url}/v1/models", headers=_auth(secret), timeout=WAIT)
    after = run_cli(env, "keys", "list")
    twice = run_cli(env, "keys", "revoke", name)

    assert made.stdout == secret + "\n"  # the secret alone, once
    assert secret.startswith("avk_")
    assert len(secret) > 40
    assert secret not in made.stderr
    assert f"key {name!r} made (rpm=30/min concurrency=2)" in made.stderr
    assert "shown only now" in made.stderr
    [line] = [line for line in listed.stdout.splitlines() if line.startswith(name)]
    assert "rpm=30/min concurrency=2" in line
    [entry] = [k for k in json.loads(as_json.stdout) if k["name"] == name]
    assert (entry["rpm"], entry["concurrency"]) == (30, 2)
    for output in (listed, as_json, again, revoked, after):
        assert secret not in output.stdout + output.stderr
    # Redis holds the secret's SHA-256 digest, never the secret.
    assert secret.encode() not in held
    assert secret[4:].encode() not in held
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in held
    assert again.returncode == 1
    assert again.stdout == ""
    assert f"a key named {name!r} exists" in again.stderr
    assert served.status_code == 200
    assert revoked.returncode == 0, revoked.stderr
    assert refused.status_code == 401
    assert name not in after.stdout
    assert twice.returncode == NotFound.exit_code
    assert f"no key named {name!r}" in twice.stderr


def test_a_key_over_its_requests_a_minute_gets_a_429_with_an_honest_retry_after(
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    sim: OllamaSimulator,
    key_prefix: str,
) -> None:
    worker_factory(sim.url)
    key, secret = keys.create(_name("rpm"), rpm=2)
    gateway = gateway_factory(require_keys=True)
    window = requests_key(key_prefix, key.name)
    with httpx.Client(base_url=gateway.url, timeout=WAIT, headers=_auth(secret)) as client:
        served = [client.post(GENERATE[0], json=GENERATE[1]) for _ in range(2)]
        latest = _frees_in(window)
        over = client.post(GENERATE[0], json=GENERATE[1])
        earliest = _frees_in(window)
        over_openai = client.post(CHAT[0], json=CHAT[1])
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}])

    assert [a.status_code for a in served] == [200, 200]
    message = _assert_ollama_error(over, 429)
    assert message == f"key {key.name!r} is over its 2 requests a minute"
    # When the first request leaves the 60 s window, as Redis's clock says, in whole seconds.
    assert math.ceil(earliest) <= _retry_after(over) <= math.ceil(latest)
    _assert_openai_error(over_openai, 429, "requests", "rate_limit_exceeded")
    assert 1 <= _retry_after(over_openai) <= 60
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) <= 60
    print(
        f"rpm 2: third request 429, Retry-After {over.headers['Retry-After']} s "
        f"(the window frees in {earliest:.2f}-{latest:.2f} s); OpenAI shape 429, "
        f"Retry-After {over_openai.headers['Retry-After']} s"
    )


def _frees_in(window: str) -> float:
    """Seconds, by Redis's clock, until the oldest request of a full ``window`` leaves it."""
    client = _redis()
    [(_, oldest)] = client.zrange(window, 0, 0, withscores=True)
    seconds, micros = client.time()
    return (oldest + 60_000 - (seconds * 1000 + micros / 1000)) / 1000


def _slot_ends(slots: str) -> list[float]:
    """The lease ends (ms, Redis's clock) of the slots held in ``slots``."""
    return [score for _, score in _redis().zrange(slots, 0, -1, withscores=True)]


def _redis_ms() -> float:
    seconds, micros = _redis().time()
    return seconds * 1000 + micros / 1000


def test_a_key_at_its_concurrency_gets_a_429_until_its_stream_ends(
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    slow_sim: OllamaSimulator,
    key_prefix: str,
) -> None:
    worker_factory(slow_sim.url)
    key, secret = keys.create(_name("concurrency"), concurrency=1)
    gateway = gateway_factory(require_keys=True, slot_lease_s=1)
    slots = slots_key(key_prefix, key.name)
    with httpx.Client(base_url=gateway.url, timeout=WAIT, headers=_auth(secret)) as client:
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

    message = _assert_ollama_error(busy, 429)
    assert message == f"key {key.name!r} has its 1 requests at once running"
    assert _retry_after(busy) == 1
    assert len(renewed) == 1
    assert renewed[0] > lease_end
    _assert_openai_error(still_busy, 429, "requests", "rate_limit_exceeded")
    assert _retry_after(still_busy) == 1
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
    worker_factory(slow_sim.url)
    key, secret = keys.create(_name("leaves"), concurrency=1)
    gateway = gateway_factory(require_keys=True)  # a 30 s lease, renewed while held
    slots = slots_key(key_prefix, key.name)
    with httpx.Client(base_url=gateway.url, timeout=WAIT, headers=_auth(secret)) as client:
        with client.stream("POST", "/api/generate", json=STREAM) as first:
            assert json.loads(next(first.iter_lines()))["done"] is False
            assert len(_slot_ends(slots)) == 1
        # Gone after its first piece: the gateway notices at the next one and lets go.
        wait_for(lambda: not _slot_ends(slots), timeout=20, what="the slot's release")
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
    key, secret = keys.create(_name("orphan"), concurrency=1)
    slots = slots_key(key_prefix, key.name)
    port = free_port()
    env = service_env(
        broker_url, key_prefix, AVOCADO_INFER_PORT=str(port), AVOCADO_INFER_SLOT_LEASE_S="10"
    )
    log = tmp_path / "infer.log"
    doomed = Child(spawn([str(VENV_BIN / "avocado-infer")], log, env=env, cwd=tmp_path), log)
    survivor = gateway_factory(require_keys=True)
    try:
        wait_for(lambda: _answers(port, doomed), timeout=WAIT, what="avocado-infer")
        url = f"http://127.0.0.1:{port}/api/generate"
        with httpx.stream("POST", url, json=STREAM, headers=_auth(secret), timeout=WAIT) as held:
            assert json.loads(next(held.iter_lines()))["done"] is False
            doomed.kill()  # SIGKILL: it never releases its slot
    finally:
        code = doomed.stop()
    with httpx.Client(base_url=survivor.url, timeout=WAIT, headers=_auth(secret)) as client:
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


@pytest.fixture
def vhost(rabbit: Broker) -> Iterator[str]:
    """A vhost of this test only, with no worker consuming; set up before the test's
    gateways, so deleted after they stop."""
    with isolated_vhost(rabbit) as url:
        yield url


def test_a_queue_at_its_limit_is_a_503_with_retry_after(
    vhost: str, key_prefix: str, gateway_factory: Gateways
) -> None:
    fleet = Settings(broker_url=vhost, redis_url=REDIS_URL, key_prefix=key_prefix)
    with Producer(fleet) as producer:
        for n in range(2):
            producer.generate(f"Waiting {n}.")
    full = gateway_factory(fleet=fleet, max_queue=2, busy_retry_after_s=7, stream_timeout_s=1)
    roomy = gateway_factory(fleet=fleet, max_queue=3, stream_timeout_s=1)
    with httpx.Client(timeout=WAIT) as client:
        refused = client.post(f"{full.url}{GENERATE[0]}", json=GENERATE[1])
        refused_openai = client.post(f"{full.url}{CHAT[0]}", json=CHAT[1])
        depth_then = _depth(fleet)
        queued = client.post(f"{roomy.url}{GENERATE[0]}", json=GENERATE[1])

    message = _assert_ollama_error(refused, 503)
    assert "2 jobs wait in the queue" in message
    assert "AVOCADO_INFER_MAX_QUEUE=2" in message
    assert _retry_after(refused) == 7
    _assert_openai_error(refused_openai, 503, "server_error", None)
    assert _retry_after(refused_openai) == 7
    assert depth_then == 2  # neither was queued
    # Below its limit a gateway queues the job, which waits for a worker that never comes.
    assert queued.status_code == 504, queued.text
    assert _depth(fleet) == 3
    print(f"queue of 2 at a limit of 2: 503 {message!r}, Retry-After 7 s")


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """A RabbitMQ 4 node of this module, whose alarms block publishers."""
    node = RabbitNode.private(4, free_port())
    try:
        yield node.start()
    finally:
        node.wipe()


@pytest.fixture
def alarmed_vhost(node: RabbitNode) -> Iterator[str]:
    with isolated_vhost(node.broker()) as url:
        yield url


def test_a_broker_that_blocks_publishing_is_a_503_with_retry_after(
    alarmed_vhost: str, node: RabbitNode, gateway_factory: Gateways
) -> None:
    prefix = f"avocado-test-{uuid.uuid4().hex[:8]}:"
    fleet = Settings(
        broker_url=alarmed_vhost, redis_url=REDIS_URL, key_prefix=prefix, publish_timeout_s=30
    )
    with Producer(fleet) as producer, producer.app.connection_for_write() as connection:
        declare_topology(connection, fleet)
    gateway = gateway_factory(fleet=fleet, busy_retry_after_s=7)
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as client:
        assert client.get("/readyz").status_code == 200
        with alarm_raised(node, "memory") as reason:
            answers = [client.post(path, json=body) for path, body in (GENERATE, CHAT, GENERATE)]
    flags = list(_redis().scan_iter(cancel_key(prefix, "*")))

    first, shaped, later = answers
    sent = _assert_ollama_error(first, 503)
    assert f"the broker blocked publishing ({reason})" in sent  # sent, then blocked
    assert f"the broker blocks publishing ({reason})" in _assert_openai_error(
        shaped, 503, "server_error", None
    )
    assert f"not published: the broker blocks publishing ({reason})" in _assert_ollama_error(
        later, 503
    )
    assert [_retry_after(a) for a in answers] == [7, 7, 7]
    # The job sent before the block was known is cancelled: no one waits for its answer.
    assert len(flags) == 1
    for answer in answers:
        print(f"blocked broker: {answer.status_code}, Retry-After 7 s: {answer.text}")


@contextmanager
def _captured(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Every log record of this process at DEBUG, uvicorn's access log included (uvicorn's
    loggers do not propagate to the root)."""
    caplog.set_level(logging.DEBUG)
    own = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.access")]
    levels = [logger.level for logger in own]
    for logger in own:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(caplog.handler)
    try:
        yield caplog.records
    finally:
        for logger, level in zip(own, levels, strict=True):
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)




def test_no_key_appears_in_the_gateways_logs(
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    sim: OllamaSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker_factory(sim.url)
    key, secret = keys.create(_name("logged"), rpm=1)
    wrong = "avk_" + "z" * 43
    gateway = gateway_factory(require_keys=True)
    with _captured(caplog) as records, httpx.Client(base_url=gateway.url, timeout=WAIT) as c:
        statuses = [
            c.post(GENERATE[0], json=GENERATE[1]).status_code,
            c.post(GENERATE[0], json=GENERATE[1], headers=_auth(wrong)).status_code,
            c.post(GENERATE[0], json=GENERATE[1], headers=_auth(secret)).status_code,
            c.post(CHAT[0], json=CHAT[1], headers=_auth(secret)).status_code,
        ]
        keys.revoke(key.name)
        statuses.append(c.post(GENERATE[0], json=GENERATE[1], headers=_auth(secret)).status_code)
        logged = "\n".join(record.getMessage() for record in records)
        everything = "\n".join(repr(record.__dict__) for record in records)  # args, extras

    assert statuses == [401, 401, 200, 429, 401]
    # The gateway logged each refusal, and the access log each request...
    assert logged.count("POST /api/generate refused: no API key") == 1
    assert logged.count("POST /api/generate refused: an unknown or revoked API key") == 2
    assert f"POST /v1/chat/completions refused: key {key.name!r} is over its 1 requests" in logged
    assert logged.count('"POST /api/generate HTTP/1.1" 401') == 3
    # ...and no secret, nor a piece of one.
    for secret_ in (secret, wrong):
        assert secret_[4:20] not in logged
        assert secret_[4:20] not in everything
