"""avocado-infer's API keys, on the real Redis: 401 without a live key in each API's shape,
keys made, listed and revoked with the ``avocado`` command and stored only as digests, and no
secret in any log. Their limits: test_infer_limits.py."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import ollama
import openai
import pytest

from avocado_shared import Settings
from avocado_shared.errors import NotFound
from avocado_shared.keys import KeyStore
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.infer_http import (
    ASK,
    CHAT,
    GENERATE,
    MODEL,
    WAIT,
    Gateways,
    assert_ollama_error,
    assert_openai_error,
    auth,
    depth,
    redis_client,
    unique,
)
from tests.services import run_cli, service_env


def test_no_key_a_wrong_key_or_a_revoked_key_is_a_401_in_each_apis_shape(
    gateway_factory: Gateways, keys: KeyStore, settings: Settings
) -> None:
    gateway = gateway_factory(require_keys=True)
    key, secret = keys.create(unique("revoked"))
    queued = depth(settings)
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as client:
        assert client.get("/api/tags", headers=auth(secret)).status_code == 200
        assert client.get("/v1/models", headers=auth(secret)).status_code == 200
        wrong = "avk_" + "w" * 43
        live = {
            "no key": {},
            "a wrong key": auth(wrong),
            "a Basic login": {"Authorization": "Basic eDp5"},
        }
        answers = {what: _refusals(client, headers) for what, headers in live.items()}
        keys.revoke(key.name)
        answers["a revoked key"] = _refusals(client, auth(secret))
        open_routes = [client.get(path).status_code for path in ("/healthz", "/readyz", "/metrics")]

    for what, (plain, shaped) in answers.items():
        for answer in plain:
            message = assert_ollama_error(answer, 401)
            assert answer.headers["WWW-Authenticate"] == "Bearer"
            assert secret not in answer.text
            assert wrong not in answer.text
        for answer in shaped:
            message = assert_openai_error(answer, 401, "invalid_request_error", "invalid_api_key")
            assert answer.headers["WWW-Authenticate"] == "Bearer"
        print(f"{what}: 401 {message!r}")
    assert open_routes == [200, 200, 200]
    assert depth(settings) == queued  # nothing was queued

    # The clients no one here wrote see the 401 as theirs.
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk.models.list()
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        ollama.Client(host=gateway.url, headers=auth(secret)).generate(model=MODEL, prompt=ASK)
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
        client.get(f"/jobs/{uuid.uuid4()}", headers=headers),
        client.post("/jobs/summarize", json={"share_id": "s", "content": {}}, headers=headers),
    ]
    shaped = [
        client.post(CHAT[0], json=CHAT[1], headers=headers),
        client.get("/v1/models", headers=headers),
    ]
    return plain, shaped


def _stored(key_prefix: str) -> bytes:
    """Every name and value Redis holds about API keys under ``key_prefix``."""
    client = redis_client()
    held = b""
    for name in client.scan_iter(f"{key_prefix}apikey*"):
        held += name + b"".join(k + v for k, v in client.hgetall(name).items())
    return held


def test_the_avocado_command_makes_lists_and_revokes_a_key(
    broker_url: str, key_prefix: str, gateway_factory: Gateways
) -> None:
    env = service_env(broker_url, key_prefix)
    name = unique("cli")
    made = run_cli(
        env, "keys", "create", name, "--rpm", "30", "--concurrency", "2", "--lane", "batch"
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    listed = run_cli(env, "keys", "list")
    as_json = run_cli(env, "keys", "list", "--json")
    held = _stored(key_prefix)
    again = run_cli(env, "keys", "create", name)
    gateway = gateway_factory(require_keys=True)
    served = httpx.get(f"{gateway.url}/v1/models", headers=auth(secret), timeout=WAIT)
    revoked = run_cli(env, "keys", "revoke", name)
    refused = httpx.get(f"{gateway.url}/v1/models", headers=auth(secret), timeout=WAIT)
    after = run_cli(env, "keys", "list")
    twice = run_cli(env, "keys", "revoke", name)

    assert made.stdout == secret + "\n"  # the secret alone, once
    assert secret.startswith("avk_")
    assert len(secret) > 40
    assert secret not in made.stderr
    assert f"key {name!r} made (rpm=30/min concurrency=2 lane=batch)" in made.stderr
    assert "shown only now" in made.stderr
    [line] = [line for line in listed.stdout.splitlines() if line.startswith(name)]
    assert "rpm=30/min concurrency=2 lane=batch" in line
    [entry] = [k for k in json.loads(as_json.stdout) if k["name"] == name]
    assert (entry["rpm"], entry["concurrency"], entry["lane"]) == (30, 2, "batch")
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
    key, secret = keys.create(unique("logged"), rpm=1)
    wrong = "avk_" + "z" * 43
    gateway = gateway_factory(require_keys=True)
    with _captured(caplog) as records, httpx.Client(base_url=gateway.url, timeout=WAIT) as c:
        statuses = [
            c.post(GENERATE[0], json=GENERATE[1]).status_code,
            c.post(GENERATE[0], json=GENERATE[1], headers=auth(wrong)).status_code,
            c.post(GENERATE[0], json=GENERATE[1], headers=auth(secret)).status_code,
            c.post(CHAT[0], json=CHAT[1], headers=auth(secret)).status_code,
        ]
        keys.revoke(key.name)
        statuses.append(c.post(GENERATE[0], json=GENERATE[1], headers=auth(secret)).status_code)
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
