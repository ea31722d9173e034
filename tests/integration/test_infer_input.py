"""Bad input to avocado-infer: a 400 in the API's own error shape, never a 500, and no job
queued. No worker runs in this module, so a job that was queued stays countable in
``ml.generate``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from kombu.connection import Connection

from avocado_shared import Settings
from avocado_shared.routing import Lane
from avocado_shared.topology import declare_lane_queues, declare_topology
from tests.gateway import InProcessGateway
from tests.rabbit import DEFAULT_MODEL, lane_queue

MODEL = DEFAULT_MODEL
QUEUE = lane_queue(Lane.INTERACTIVE)
USER = [{"role": "user", "content": "Hi"}]


class Queue:
    """The interactive lane queue of the default model, declared if it was not."""

    def __init__(self, connection: Connection, settings: Settings) -> None:
        declare_topology(connection, settings)  # the exchange the lane queues bind to
        declare_lane_queues(connection, DEFAULT_MODEL, settings)
        self.channel = connection.channel()

    def __call__(self) -> tuple[int, int]:
        """Its (messages, consumers)."""
        _, messages, consumers = self.channel.queue_declare(QUEUE, passive=True)
        return int(messages), int(consumers)

    def purge(self) -> None:
        self.channel.queue_purge(QUEUE)


@pytest.fixture(scope="module")
def queue(broker_url: str, settings: Settings) -> Iterator[Queue]:
    with Connection(broker_url) as connection:
        yield Queue(connection, settings)


@pytest.fixture
def client(
    gateway_factory: Callable[..., InProcessGateway], queue: Queue
) -> Iterator[httpx.Client]:
    """A client of a fresh gateway that queues jobs for a model no node serves; after the
    test, the queue holds no more jobs than before, and nothing consumes it (what another
    module left there stays)."""
    before, consumers = queue()
    assert consumers == 0
    with httpx.Client(base_url=gateway_factory(hold_unserved=True).url, timeout=30) as made:
        yield made
    assert queue() == (before, 0), "a bad request queued a job"


OLLAMA_BAD = [
    ("/api/generate", b'{"model": "m", "prompt": '),  # malformed JSON
    ("/api/generate", b"[1, 2]"),
    ("/api/generate", b'{"model": "m\xff", "prompt": "Hi"}'),  # not UTF-8: FastAPI's own 400
    ("/api/chat", b"<\xff"),
    ("/api/generate", {"prompt": "Hi"}),  # no model
    ("/api/generate", {"model": MODEL}),  # no prompt
    ("/api/generate", {"model": MODEL, "prompt": 5}),
    ("/api/generate", {"model": MODEL, "prompt": "  "}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "stream": "sometimes"}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"stop": {"no": 1}}}),
    ("/api/generate", {"model": "two words", "prompt": "Hi"}),
    ("/api/chat", {"model": MODEL}),  # no messages
    ("/api/chat", {"model": MODEL, "messages": "Hi"}),
    ("/api/chat", {"model": MODEL, "messages": []}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]}),
    ("/api/chat", {"model": MODEL, "messages": [{"content": "Hi"}], "stream": False}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "images": ["not base64!"]}),
    ("/api/chat", {"model": MODEL, "messages": [{**USER[0], "images": ["data:,x"]}]}),
]

OPENAI_BAD = [
    ("/v1/chat/completions", b"{nope"),
    ("/v1/chat/completions", b'{"model": "m\xff", "messages": []}'),  # not UTF-8
    ("/v1/completions", b"<\xff"),
    ("/v1/chat/completions", {"messages": USER}),  # no model
    ("/v1/chat/completions", {"model": MODEL}),  # no messages
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "n": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": "many"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True, "stop": 7}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "oracle", "content": "x"}]}),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": USER, "response_format": {"type": "json_schema"}},
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
    ),
    ("/v1/completions", {"model": MODEL}),  # no prompt
    ("/v1/completions", {"model": MODEL, "prompt": ["one", "two"]}),
    ("/v1/completions", {"model": MODEL, "prompt": "", "stream": True}),
]


def _post(client: httpx.Client, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def _ollama_message(error: dict[str, Any]) -> str:
    assert list(error) == ["error"]
    assert isinstance(error["error"], str)
    return error["error"]


def _openai_message(body: dict[str, Any]) -> str:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return str(error["message"])


@pytest.mark.parametrize(("path", "body"), OLLAMA_BAD + OPENAI_BAD)
def test_bad_request_is_a_400_in_its_apis_error_shape(
    client: httpx.Client, path: str, body: bytes | dict[str, Any]
) -> None:
    answer = _post(client, path, body)

    assert answer.status_code == 400, answer.text
    message = _openai_message if path.startswith("/v1/") else _ollama_message
    assert message(answer.json())


def test_the_openai_sdk_reads_the_error(client: httpx.Client) -> None:
    base_url = str(client.base_url).rstrip("/") + "/v1"
    sdk = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    image = [{"type": "image_url", "image_url": {"url": "https://example.test/a.png"}}]

    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}])

    assert raised.value.status_code == 400
    assert raised.value.body == {
        "message": "image_url: only data URLs are accepted (data:image/png;base64,...), since "
        "the fleet's nodes fetch nothing from the internet",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_a_good_request_is_queued_and_waits_for_its_answer(
    gateway_factory: Callable[..., InProcessGateway], queue: Queue
) -> None:
    """What the bad requests above are measured against: a good one queues one job, and
    with no worker to take it the gateway gives up after ``stream_timeout_s``."""
    gateway = gateway_factory(stream_timeout_s=1, hold_unserved=True)
    before, _ = queue()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            answer = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi"})
        assert queue() == (before + 1, 0)
    finally:
        queue.purge()

    assert answer.status_code == 504
    assert "no entry in stream" in answer.json()["error"]


def test_a_body_over_the_limit_is_a_413_and_queues_nothing(
    gateway_factory: Callable[..., InProcessGateway], queue: Queue
) -> None:
    before, _ = queue()
    url = gateway_factory(hold_unserved=True, max_body_bytes=64 * 1024).url
    image = "A" * (64 * 1024)  # base64, as Ollama's API carries images

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        yield b'{"model": "%s", "prompt": "Hi", "images": ["' % MODEL.encode()
        yield image.encode()
        yield b'"]}'

    with httpx.Client(base_url=url, timeout=30) as client:
        declared = client.post(
            "/api/generate", json={"model": MODEL, "prompt": "Hi", "images": [image]}
        )
        chunked = client.post("/api/generate", content=chunks())
        openai_ = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": image}]},
        )

    for answer in (declared, chunked):
        assert answer.status_code == 413
        assert "over the gateway's limit of 65536 bytes" in _ollama_message(answer.json())
    assert openai_.status_code == 413
    assert "over the gateway's limit" in _openai_message(openai_.json())
    assert queue() == (before, 0)
