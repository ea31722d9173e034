"""What a client of the gateway's OpenAI API sees, on a fake gateway (``tests/fake_gateway.py``):
server-sent events ending in ``[DONE]``, the usage chunk, whole objects, errors in OpenAI's
shape with the headers the SDKs read (and a failed job's 502 in both APIs' shapes), and how a
request maps onto a job's fields."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import redis

from avocado_infer.errors import OverLimit, QueueFull
from avocado_shared.contracts import Usage
from avocado_shared.jobs import PublishError
from avocado_shared.keys import ApiKey
from avocado_shared.routing import Lane
from tests.fake_gateway import MODEL, STREAMED, USAGE, Failure, Served, events

Serve = Callable[..., Served]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ASK = [{"role": "user", "content": "Why?"}]
NOT_TO_RETRY = {"x-should-retry": "false"}
TOTALS = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def body(path: str, **fields: Any) -> dict[str, Any]:
    """A request to ``path``: a chat's messages or a completion's prompt, and ``fields``."""
    asked = {"prompt": "Why?"} if path != CHAT else {"messages": ASK}
    return {"model": MODEL, **asked, **fields}


def heads(chunks: list[Any], path: str, streamed: bool = True) -> list[Any]:
    """The chunks (``[DONE]`` as is) without their ``id``, ``object`` and ``created``, once
    each is checked: the job's id after the API's prefix, the API's object, a time of now."""
    chat = path == CHAT
    expected = (
        "chatcmpl-job-1" if chat else "cmpl-job-1",
        ("chat.completion.chunk" if streamed else "chat.completion") if chat else "text_completion",
    )
    now = int(time.time())
    rest = []
    for chunk in chunks:
        if isinstance(chunk, dict) and "id" in chunk:
            assert (chunk.pop("id"), chunk.pop("object")) == expected
            assert now - 5 <= chunk.pop("created") <= now
        rest.append(chunk)
    return rest


def piece(path: str, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    """A streamed chunk's choice: a chat's delta (``None``: empty) or a completion's text."""
    if path == CHAT:
        held = {"delta": {} if text is None else {"content": text}}
    else:
        held = {"text": text or ""}
    return {"index": 0, "logprobs": None, **held, "finish_reason": finish_reason}


def first_piece(path: str, text: str) -> dict[str, Any]:
    """The first streamed chunk's choice: a chat's first delta carries the role."""
    choice = piece(path, text)
    if path == CHAT:
        choice["delta"] = {"role": "assistant", "content": text}
    return choice


def openai_error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: its type by status."""
    kind = "requests" if status == 429 else "invalid_request_error"
    return {
        "error": {
            "message": message,
            "type": "server_error" if status >= 500 else kind,
            "param": None,
            "code": code,
        }
    }


APIS = pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])


@APIS
def test_a_streamed_answer_is_events_ending_in_done(served: Serve, path: str) -> None:
    app = served()
    app.fake.script("Hel", "lo", USAGE)
    response = app.client.post(path, json=body(path, stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["x-avocado-job-id"] == "job-1"
    assert heads(events(response.content), path) == [
        {"model": MODEL, "choices": [first_piece(path, "Hel")]},
        {"model": MODEL, "choices": [piece(path, "lo")]},
        {"model": MODEL, "choices": [piece(path, None, "stop")]},
        "[DONE]",
    ]


@APIS
def test_include_usage_adds_a_usage_chunk_and_null_usage_to_the_others(
    served: Serve, path: str
) -> None:
    app = served()
    usage = Usage(model=MODEL, done_reason="length", prompt_tokens=7, completion_tokens=3)
    app.fake.script("Hi", usage)
    options = {"stream_options": {"include_usage": True}}
    response = app.client.post(path, json=body(path, stream=True, **options))
    assert heads(events(response.content), path) == [
        {"model": MODEL, "choices": [first_piece(path, "Hi")], "usage": None},
        {"model": MODEL, "choices": [piece(path, None, "length")], "usage": None},
        {"model": MODEL, "choices": [], "usage": TOTALS},
        "[DONE]",
    ]


@APIS
def test_a_whole_answer_is_one_object_with_its_usage(served: Serve, path: str) -> None:
    app = served()
    app.fake.script("Hel", "lo", USAGE)
    response = app.client.post(path, json=body(path))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-avocado-job-id"] == "job-1"
    if path == CHAT:
        held: dict[str, Any] = {"message": {"role": "assistant", "content": "Hello"}}
    else:
        held = {"text": "Hello"}
    choice = {"index": 0, "logprobs": None, **held, "finish_reason": "stop"}
    assert heads([response.json()], path, streamed=False) == [
        {"model": MODEL, "choices": [choice], "usage": TOTALS}
    ]


def test_an_empty_answer_streams_the_role_with_its_finish(served: Serve) -> None:
    app = served()
    app.fake.script(USAGE)
    response = app.client.post(CHAT, json=body(CHAT, stream=True))
    assert events(response.content)[0]["choices"] == [
        {"index": 0, "logprobs": None, "delta": {"role": "assistant"}, "finish_reason": "stop"}
    ]


@pytest.mark.parametrize(
    ("path", "told", "headers"),
    [
        ("/api/generate", {"error": "job job-1 failed: out of memory"}, {}),
        (CHAT, openai_error(502, "job job-1 failed: out of memory"), {"x-should-retry": "false"}),
        (
            COMPLETIONS,
            openai_error(502, "job job-1 failed: out of memory"),
            {"x-should-retry": "false"},
        ),
    ],
    ids=["ollama", "chat", "completions"],
)
@STREAMED
def test_a_job_that_fails_before_its_first_piece_is_a_502(
    served: Serve, path: str, told: dict[str, Any], headers: dict[str, str], stream: bool
) -> None:
    """In either API's shape, without the job's id; OpenAI's SDKs are told not to retry."""
    app = served()
    app.fake.script(Failure("out of memory"))
    response = app.client.post(path, json=body(path, stream=stream))
    assert response.status_code == 502
    assert response.json() == told
    assert {k: v for k, v in response.headers.items() if k.startswith("x-")} == headers


@APIS
def test_a_job_that_fails_mid_stream_ends_with_an_error_event_and_no_done(
    served: Serve, path: str
) -> None:
    app = served()
    app.fake.script("Hel", Failure("out of memory"))
    chunks = events(app.client.post(path, json=body(path, stream=True)).content)
    assert len(chunks) == 2
    assert chunks[-1] == openai_error(502, "job job-1 failed: out of memory")


def test_a_job_that_never_starts_is_a_504_to_retry(served: Serve) -> None:
    app = served(stream_timeout_s=0.05)
    app.fake.script()
    response = app.client.post(CHAT, json=body(CHAT))
    assert response.status_code == 504
    assert response.json() == openai_error(504, "no entry in stream for job job-1 in 0.05s")
    assert "x-should-retry" not in response.headers


@pytest.mark.parametrize(
    ("method", "error", "status", "retry_after", "code"),
    [
        ("generate", PublishError("the broker is unreachable", retry_after=5), 503, "5", None),
        ("generate", QueueFull("100 jobs wait", retry_after=2.2), 503, "3", None),
        ("admit", OverLimit("over its 1 requests a minute", 0.25), 429, "1", "rate_limit_exceeded"),
    ],
)
def test_not_now_answers_say_when_to_come_back(
    served: Serve,
    method: str,
    error: Exception,
    status: int,
    retry_after: str,
    code: str | None,
) -> None:
    app = served(require_keys=True)
    app.fake.keys["avk_s"] = ApiKey("app", rpm=1, concurrency=0, created_at=datetime.now())
    app.fake.failing[method] = error
    response = app.client.post(CHAT, json=body(CHAT), headers={"Authorization": "Bearer avk_s"})
    assert response.status_code == status
    assert response.json() == openai_error(status, str(error), code)
    assert response.headers["retry-after"] == retry_after
    assert "x-should-retry" not in response.headers
    assert app.fake.published == []


@pytest.mark.parametrize("method", ["key", "admit"])
def test_keys_that_cannot_be_checked_are_a_503(served: Serve, method: str) -> None:
    app = served(require_keys=True, busy_retry_after_s=7)
    app.fake.keys["avk_s"] = ApiKey("app", rpm=0, concurrency=2, created_at=datetime.now())
    app.fake.failing[method] = redis.ConnectionError("Connection refused")
    response = app.client.post(CHAT, json=body(CHAT), headers={"Authorization": "Bearer avk_s"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert "Redis does not answer: Connection refused" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "no API key: send one as 'Authorization: Bearer <key>'"),
        ({"Authorization": "Bearer avk_wrong"}, "the API key is unknown or revoked"),
    ],
)
def test_without_a_good_key_a_401_asks_for_a_bearer(
    served: Serve, headers: dict[str, str], message: str
) -> None:
    app = served(require_keys=True)
    response = app.client.post(CHAT, json=body(CHAT), headers=headers)
    assert response.status_code == 401
    assert response.json() == openai_error(401, message, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-should-retry"] == "false"
    assert app.fake.published == []


def test_a_good_key_is_checked_once_and_its_slot_held_until_the_end(served: Serve) -> None:
    app = served(require_keys=True)
    app.fake.keys["avk_s"] = ApiKey("app", rpm=0, concurrency=2, created_at=datetime.now())
    app.fake.script("Hi", USAGE)
    auth = {"Authorization": "Bearer avk_s"}
    response = app.client.post(CHAT, json=body(CHAT, stream=True), headers=auth)
    assert events(response.content)[-1] == "[DONE]"
    assert app.fake.secrets_checked == ["avk_s"]
    assert (app.fake.held, [s.slots for s in app.fake.released]) == (set(), ["slots:app"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 2}, "invalid request: n: Input should be 1"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "content parts of type input_audio are not supported (text and image_url are)",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema: an object is required",
        ),
        (
            {"max_tokens": 0},
            "invalid request: max_tokens: Input should be greater than or equal to 1",
        ),
        (
            {"messages": []},
            "invalid request: messages: List should have at least 1 item after validation, not 0",
        ),
    ],
)
def test_a_request_it_cannot_serve_is_a_400(
    served: Serve, fields: dict[str, Any], message: str
) -> None:
    app = served()
    response = app.client.post(CHAT, json=body(CHAT, **fields))
    assert response.status_code == 400
    assert response.json() == openai_error(400, message)
    assert app.fake.published == []


def test_malformed_json_is_a_400_in_openai_shape(served: Serve) -> None:
    app = served()
    json_type = {"content-type": "application/json"}
    response = app.client.post(COMPLETIONS, content=b'{"model": ', headers=json_type)
    assert response.status_code == 400
    assert response.json() == openai_error(400, "invalid request: 10: JSON decode error")


def test_a_chat_publishes_its_messages_options_and_format(served: Serve) -> None:
    app = served()
    for _ in range(4):
        app.fake.script(USAGE)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
        },
        {"role": "assistant", "content": None},
    ]
    sampling = {"temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n", "frequency_penalty": 1}
    formats = [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        {"type": "text"},
    ]
    app.client.post(CHAT, json=body(CHAT, messages=messages, max_completion_tokens=9, **sampling))
    for response_format in formats:
        app.client.post(CHAT, json=body(CHAT, max_tokens=4, response_format=response_format))
    assert app.fake.published == [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": ""},
            ],
            "model": MODEL,
            "options": {
                "num_predict": 9,
                "temperature": 0.5,
                "top_p": 0.9,
                "stop": ["\n"],
                "seed": 3,
                "frequency_penalty": 1.0,
            },
            "format": None,
            "lane": Lane.INTERACTIVE,
        },
        *(
            {
                "messages": ASK,
                "model": MODEL,
                "options": {"num_predict": 4},
                "format": format_,
                "lane": Lane.INTERACTIVE,
            }
            for format_ in ["json", schema, None]
        ),
    ]


def test_a_completion_publishes_its_prompt_and_options(served: Serve) -> None:
    app = served()
    for _ in range(2):
        app.fake.script(USAGE)
    app.client.post(COMPLETIONS, json=body(COMPLETIONS, max_tokens=5, stop=["a", "b"]))
    app.client.post(COMPLETIONS, json=body(COMPLETIONS, prompt=["One prompt"]))
    interactive = {"model": MODEL, "lane": Lane.INTERACTIVE}
    assert app.fake.published == [
        {"prompt": "Why?", "options": {"num_predict": 5, "stop": ["a", "b"]}} | interactive,
        {"prompt": "One prompt", "options": {}} | interactive,
    ]
