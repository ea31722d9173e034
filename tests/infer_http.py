"""Requests to avocado-infer and checks of its answers, shared by the tests of its keys and
limits: the routes asked, a key's header, each API's error shape, ``Retry-After``."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import redis

from avocado_shared import Producer, Settings
from avocado_shared.routing import Lane
from avocado_shared.topology import declare_lane_queues, declare_topology
from tests.gateway import InProcessGateway
from tests.rabbit import DEFAULT_MODEL, lane_queue
from tests.services import REDIS_URL, wait_for

__all__ = [
    "ASK",
    "CHAT",
    "GENERATE",
    "MODEL",
    "STREAM",
    "WAIT",
    "Gateways",
    "assert_ollama_error",
    "assert_openai_error",
    "auth",
    "depth",
    "redis_client",
    "retry_after",
    "unique",
]

WAIT = 60
MODEL = "llama3.2:1b"
ASK = "Tell me about avocados."
GENERATE = ("/api/generate", {"model": MODEL, "prompt": ASK, "stream": False})
CHAT = ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ASK}]})
STREAM = {"model": MODEL, "prompt": ASK}  # /api/generate streams by default

Gateways = Callable[..., InProcessGateway]
"""The ``gateway_factory`` fixture."""


def unique(what: str) -> str:
    """A key name no other test uses."""
    return f"{what}-{uuid.uuid4().hex[:8]}"


def auth(secret: str) -> dict[str, str]:
    """The header that presents an API key."""
    return {"Authorization": f"Bearer {secret}"}


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def depth(fleet: Settings) -> int:
    """The jobs the gateway queued for the default model that wait, in ``fleet``'s vhost."""
    with Producer(fleet) as producer, producer.app.connection_for_write() as connection:
        queue = lane_queue(Lane.INTERACTIVE)
        declare_topology(connection, fleet)  # the exchange the lane queues bind to
        declare_lane_queues(connection, DEFAULT_MODEL, fleet)
        declared = connection.default_channel.queue_declare(queue, passive=True)
        return int(declared.message_count)


def assert_ollama_error(answer: httpx.Response, status: int) -> str:
    """``answer`` is ``status`` in Ollama's shape; its message."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    return body["error"]


def assert_openai_error(answer: httpx.Response, status: int, kind: str, code: str | None) -> str:
    """``answer`` is ``status`` in OpenAI's shape, of type ``kind`` and ``code``; its message."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (kind, None, code)
    message: str = error["message"]
    return message


def retry_after(answer: httpx.Response) -> int:
    """``answer``'s ``Retry-After``, which must be whole seconds."""
    value = answer.headers["Retry-After"]
    assert value.isdigit(), value
    return int(value)


def job_state(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """``GET /jobs/{id}``, which must be a 200."""
    answer = client.get(f"/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def generated(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/generate`` ``body`` (not streamed); its job's state once its row says
    success (the answer's end is streamed before the worker stores the result)."""
    answer = client.post("/api/generate", json=body)
    assert answer.status_code == 200, answer.text
    job_id = answer.headers["x-avocado-job-id"]
    return wait_for(
        lambda: (s := job_state(client, job_id))["state"] == "success" and s,
        timeout=WAIT,
        what="the job's row",
    )
