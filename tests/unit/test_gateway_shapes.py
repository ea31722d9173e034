"""What a client of the gateway's Ollama API sees, on a fake gateway (``tests/fake_gateway.py``):
NDJSON chunks and their counts, one object with ``"stream": false``, errors before and after
the first piece, bad input, the job fields published. The OpenAI API, the other routes, and
Redis blips and clients that leave have modules of their own."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from avocado_infer.errors import ModelNotServed
from avocado_shared.contracts import Usage
from avocado_shared.keys import ApiKey
from avocado_shared.routing import Lane
from tests.fake_gateway import MODEL, STREAMED, USAGE, Failure, Restart, Served, ndjson

Serve = Callable[..., Served]

# USAGE's counts and durations as Ollama's last chunk has them (ns).
COUNTS = {
    "done_reason": "stop",
    "total_duration": 12_500_000,
    "load_duration": 1_250_000,
    "prompt_eval_count": 7,
    "prompt_eval_duration": 2_000_000,
    "eval_count": 3,
    "eval_duration": 8_000_000,
}
ASK = "Why is the sky blue?"
NOT_SERVED = "model 'nope:1b' not found: no live node serves it (the fleet serves: llama3.2:1b)"


class Route:
    """One of Ollama's generation routes: its path, a body, and where a chunk holds text."""

    def __init__(self, path: str, body: dict[str, Any], key: str, value: Callable[[str], Any]):
        self.path, self.body, self.key, self.value = path, body, key, value

    def chunk(self, text: str, done: bool) -> dict[str, Any]:
        return {"model": MODEL, self.key: self.value(text), "done": done}


GENERATE = Route("/api/generate", {"model": MODEL, "prompt": ASK}, "response", str)
CHAT = Route(
    "/api/chat",
    {"model": MODEL, "messages": [{"role": "user", "content": ASK}]},
    "message",
    lambda text: {"role": "assistant", "content": text},
)
ROUTES = pytest.mark.parametrize("route", [GENERATE, CHAT], ids=["generate", "chat"])


def created(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks without ``created_at``, once each is checked to be an ISO time in UTC (an
    error line has none)."""
    for chunk in chunks:
        if "error" in chunk:
            continue
        stamp = chunk.pop("created_at")
        assert stamp.endswith("Z"), stamp
        datetime.fromisoformat(stamp[:-1])  # raises unless ISO 8601
    return chunks


def ask(client: TestClient, route: Route, **fields: Any) -> Any:
    return client.post(route.path, json={**route.body, **fields})


@ROUTES
def test_a_streamed_answer_is_ndjson_chunks_then_the_counts(served: Serve, route: Route) -> None:
    app = served()
    app.fake.script("Hel", "lo", USAGE)
    response = ask(app.client, route)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["x-avocado-job-id"] == "job-1"
    chunks = ndjson(response.content)
    assert [list(c) for c in chunks[:2]] == [["model", "created_at", route.key, "done"]] * 2
    assert created(chunks) == [
        route.chunk("Hel", False),
        route.chunk("lo", False),
        route.chunk("", True) | COUNTS,
    ]
    assert app.fake.cancelled == []


@ROUTES
def test_stream_false_answers_one_object(served: Serve, route: Route) -> None:
    app = served()
    app.fake.script("Hel", "lo", USAGE)
    response = ask(app.client, route, stream=False)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-avocado-job-id"] == "job-1"
    assert created([response.json()]) == [route.chunk("Hello", True) | COUNTS]


@pytest.mark.parametrize(("reason", "told"), [("length", "length"), (None, "stop")])
def test_the_done_reason_is_the_jobs_or_stop(served: Serve, reason: str | None, told: str) -> None:
    app = served()
    usage = Usage(model=MODEL, done_reason=reason)
    for _ in range(2):
        app.fake.script("Hi", usage)
    streamed = ndjson(ask(app.client, GENERATE).content)[-1]
    whole = ask(app.client, GENERATE, stream=False).json()
    for last in (streamed, whole):
        assert {k: last[k] for k in COUNTS} == dict.fromkeys(COUNTS, 0) | {"done_reason": told}


@ROUTES
def test_a_job_that_fails_mid_stream_ends_with_an_error_line(served: Serve, route: Route) -> None:
    app = served()
    app.fake.script("Hel", Failure("out of memory"))
    response = ask(app.client, route)
    assert response.status_code == 200
    assert created(ndjson(response.content)) == [
        route.chunk("Hel", False),
        {"error": "job job-1 failed: out of memory"},
    ]


def test_a_restart_after_text_ends_the_stream_with_an_error_line(served: Serve) -> None:
    app = served()
    app.fake.script("Hel", Restart("worker lost"), "Bye", USAGE)
    chunks = created(ndjson(ask(app.client, GENERATE).content))
    assert chunks == [
        GENERATE.chunk("Hel", False),
        {
            "error": "job job-1 started its answer over on another worker (worker lost); its "
            "stored result is the new answer"
        },
    ]


def test_a_restart_before_any_text_is_invisible(served: Serve) -> None:
    app = served()
    app.fake.script(Restart(), "Hel", "lo", USAGE)
    chunks = created(ndjson(ask(app.client, GENERATE).content))
    assert chunks == [
        GENERATE.chunk("Hel", False),
        GENERATE.chunk("lo", False),
        GENERATE.chunk("", True) | COUNTS,
    ]


def test_a_whole_answer_is_the_text_after_its_last_restart(served: Serve) -> None:
    app = served()
    app.fake.script("Bye", Restart(), "Hel", "lo", USAGE)
    assert ask(app.client, GENERATE, stream=False).json()["response"] == "Hello"


@STREAMED
def test_a_job_that_never_starts_is_a_504(served: Serve, stream: bool) -> None:
    app = served(stream_timeout_s=0.05)
    app.fake.script()
    response = ask(app.client, GENERATE, stream=stream)
    assert response.status_code == 504
    assert response.json() == {"error": "no entry in stream for job job-1 in 0.05s"}


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/generate", b'{"model": "m", "prompt": ', "invalid request: 25: JSON decode error"),
        ("/api/generate", b'{"model": "m"}', "invalid request: prompt: Field required"),
        ("/api/generate", b'{"prompt": "Hi"}', "invalid request: model: Field required"),
        (
            "/api/chat",
            b'{"model": "m", "messages": []}',
            "invalid request: messages: List should have at least 1 item after validation, not 0",
        ),
        (
            "/api/chat",
            b'{"model": "m", "messages": [{"role": "robot", "content": "Hi"}]}',
            "invalid request: messages.0.role: Input should be 'system', 'user', 'assistant' "
            "or 'tool'",
        ),
        (
            "/api/generate",
            b"[]",
            "invalid request: Input should be a valid dictionary or object to extract fields from",
        ),
    ],
)
def test_bad_input_is_a_400_and_publishes_nothing(
    served: Serve, path: str, body: bytes, error: str
) -> None:
    app = served()
    response = app.client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": error}
    assert app.fake.published == []


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"format": "xml"}, "format"),
        ({"format": {"properties": {}}}, 'a JSON schema format needs a "type"'),
    ],
)
def test_a_request_the_job_contract_refuses_is_a_400(
    served: Serve, fields: dict[str, Any], error: str
) -> None:
    app = served()
    response = ask(app.client, GENERATE, **fields)
    assert response.status_code == 400
    assert list(response.json()) == ["error"]
    assert error in response.json()["error"]
    assert app.fake.published == []


def test_a_form_content_type_is_read_as_json(served: Serve) -> None:
    """``curl -d`` sends ``application/x-www-form-urlencoded``; Ollama reads JSON regardless."""
    app = served()
    app.fake.script("Hi", USAGE)
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = json.dumps({**GENERATE.body, "stream": False})
    response = app.client.post(GENERATE.path, content=body, headers=form)
    assert response.status_code == 200
    assert response.json()["response"] == "Hi"
    assert app.fake.published[0]["prompt"] == ASK


def test_generate_publishes_its_fields(served: Serve) -> None:
    app = served()
    for _ in range(2):
        app.fake.script(USAGE)
    ask(app.client, GENERATE)
    ask(
        app.client,
        GENERATE,
        system="Be brief.",
        options={"temperature": 0.2, "num_predict": 5},
        format="json",
        keep_alive="5m",
        raw=True,  # Ollama's, unused here: ignored
    )
    plain = {
        "model": MODEL,
        "prompt": ASK,
        "options": None,
        "format": None,
        "keep_alive": None,
        "lane": Lane.INTERACTIVE,
    }
    assert app.fake.published == [
        plain | {"system": None},
        plain
        | {
            "system": "Be brief.",
            "options": {"temperature": 0.2, "num_predict": 5},
            "format": "json",
            "keep_alive": "5m",
        },
    ]


def test_chat_publishes_its_messages_and_fields(served: Serve) -> None:
    app = served()
    app.fake.script(USAGE)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look:", "images": ["aGk="]},
        {"role": "assistant", "content": "An avocado."},
    ]
    ask(app.client, CHAT, messages=messages, format=schema, keep_alive=0, options={"seed": 1})
    assert app.fake.published == [
        {
            "messages": messages,
            "model": MODEL,
            "options": {"seed": 1},
            "format": schema,
            "keep_alive": 0,
            "lane": Lane.INTERACTIVE,
        }
    ]


def test_a_request_chooses_its_lane_in_a_header(served: Serve) -> None:
    app = served()
    app.fake.script(USAGE)
    app.client.post(GENERATE.path, json=GENERATE.body, headers={"X-Avocado-Lane": "Batch"})
    assert app.fake.published[0]["lane"] is Lane.BATCH
    refused = app.client.post(GENERATE.path, json=GENERATE.body, headers={"X-Avocado-Lane": "now"})
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "X-Avocado-Lane: unknown lane 'now': one of interactive, batch"
    }
    assert len(app.fake.published) == 1


def test_a_keys_lane_is_its_requests_default(served: Serve) -> None:
    app = served(require_keys=True)
    app.fake.keys["avk_s"] = ApiKey(
        "bulk", rpm=0, concurrency=0, created_at=datetime.now(), lane=Lane.BATCH
    )
    app.fake.script(USAGE)
    app.fake.script(USAGE)
    auth = {"Authorization": "Bearer avk_s"}
    app.client.post(GENERATE.path, json=GENERATE.body, headers=auth)
    app.client.post(
        GENERATE.path, json=GENERATE.body, headers={**auth, "X-Avocado-Lane": "interactive"}
    )
    assert [job["lane"] for job in app.fake.published] == [Lane.BATCH, Lane.INTERACTIVE]


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/api/generate", {"error": NOT_SERVED}),
        (
            "/v1/completions",
            {
                "error": {
                    "message": NOT_SERVED,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            },
        ),
    ],
)
def test_a_model_no_node_serves_is_a_404_in_the_apis_shape(
    served: Serve, path: str, answer: dict[str, Any]
) -> None:
    app = served()
    app.fake.failing["generate"] = ModelNotServed(NOT_SERVED)
    response = app.client.post(path, json={"model": "nope:1b", "prompt": ASK})
    assert (response.status_code, response.json()) == (404, answer)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/api/generate", {"error": "There was an error parsing the body"}),
        (
            "/v1/completions",
            {
                "error": {
                    "message": "There was an error parsing the body",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
    ],
)
def test_a_body_that_is_not_utf8_is_a_400_in_the_apis_shape(
    served: Serve, path: str, error: dict[str, Any]
) -> None:
    app = served()
    json_type = {"content-type": "application/json"}
    response = app.client.post(path, content=b'{"model": "\xff"}', headers=json_type)
    assert (response.status_code, response.json()) == (400, error)
