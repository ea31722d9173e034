"""What the gateway does with images, with a request its inference server refused, with a body
over its limit and with Ollama's model-management routes, on a fake gateway
(``tests/fake_gateway.py``), in each API's shapes."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from avocado_shared.routing import Lane
from tests.fake_gateway import MODEL, STREAMED, USAGE, Failure, Served

Serve = Callable[..., Served]

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
NOT_TO_RETRY = {"x-should-retry": "false"}
ONLY_DATA_URLS = (
    "image_url: only data URLs are accepted (data:image/png;base64,...), since the fleet's "
    "nodes fetch nothing from the internet"
)
REFUSED = "openai-compatible server refused the request: response_format.type: Input should be"


def _picture(url: Any) -> dict[str, Any]:
    """A user's message in OpenAI's content parts: text, then an image at ``url``."""
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "this?"}]
    return {"role": "user", "content": [*parts, {"type": "image_url", "image_url": url}]}


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def test_images_reach_the_job_in_ollamas_form_from_either_api(served: Serve) -> None:
    app = served()
    for _ in range(4):
        app.fake.script("Hi", USAGE)
    app.client.post("/api/generate", json={"model": MODEL, "prompt": "What?", "images": [PNG]})
    chat = [{"role": "user", "content": "What?", "images": [PNG, PNG]}]
    app.client.post("/api/chat", json={"model": MODEL, "messages": chat})
    for url in ({"url": f"data:image/png;base64,{PNG}", "detail": "low"}, f"data:;base64,{PNG}"):
        app.client.post("/v1/chat/completions", json={"model": MODEL, "messages": [_picture(url)]})

    generate, chatted, *openai = app.fake.published
    assert generate["images"] == [PNG]
    assert chatted["messages"] == chat
    for job in openai:
        assert job["messages"] == [{"role": "user", "content": "What is this?", "images": [PNG]}]
        assert job["lane"] is Lane.INTERACTIVE


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ({"url": "https://example.com/cat.png"}, ONLY_DATA_URLS),
        ({}, ONLY_DATA_URLS),
        ("data:image/png;base64,", ONLY_DATA_URLS),
        (
            {"url": "data:image/png;base64,not base64!"},
            "invalid generate request: messages.0.images.0: Value error, an image must be "
            "base64 data, without a data: URL prefix",
        ),
    ],
    ids=["http", "no-url", "empty", "not-base64"],
)
def test_an_image_the_nodes_cannot_take_is_a_400(served: Serve, url: Any, message: str) -> None:
    app = served()
    response = app.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [_picture(url)]}
    )
    assert (response.status_code, response.json()) == (400, _openai_error(400, message))
    assert app.fake.published == []


def test_an_ollama_image_that_is_not_base64_is_a_400(served: Serve) -> None:
    app = served()
    response = app.client.post(
        "/api/generate", json={"model": MODEL, "prompt": "What?", "images": ["a picture"]}
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid generate request: images.0: Value error, an image must be base64 "
        "data, without a data: URL prefix"
    }


@pytest.mark.parametrize(
    ("path", "told", "headers"),
    [
        ("/api/chat", {"error": f"job job-1 failed: {REFUSED}"}, {}),
        (
            "/v1/chat/completions",
            _openai_error(400, f"job job-1 failed: {REFUSED}"),
            NOT_TO_RETRY,
        ),
    ],
    ids=["ollama", "openai"],
)
@STREAMED
def test_a_request_its_server_refused_is_a_400(
    served: Serve, path: str, told: dict[str, Any], headers: dict[str, str], stream: bool
) -> None:
    """The client's request is at fault, not the fleet: not a 502 to retry."""
    app = served()
    app.fake.script(Failure(REFUSED, refused=True))
    messages = [{"role": "user", "content": "Hi"}]
    response = app.client.post(path, json={"model": MODEL, "messages": messages, "stream": stream})
    assert (response.status_code, response.json()) == (400, told)
    assert {k: v for k, v in response.headers.items() if k.startswith("x-")} == headers


def _chunks(size: int) -> Iterator[bytes]:
    """A JSON body of ``size`` bytes sent in chunks, with no Content-Length."""
    head = b'{"model": "m", "prompt": "'
    yield head
    left = size - len(head) - 2
    while left > 0:
        yield b"a" * min(left, 1000)
        left -= 1000
    yield b'"}'


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/api/generate", lambda m: {"error": m}),
        ("/v1/completions", lambda m: _openai_error(413, m)),
    ],
    ids=["ollama", "openai"],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_body_over_the_limit_is_a_413_in_the_apis_shape(
    served: Serve, path: str, shape: Callable[[str], Any], chunked: bool
) -> None:
    app = served(max_body_bytes=4096)
    app.fake.script("Hi", USAGE)
    json_ = {"content-type": "application/json"}
    fits = app.client.post(path, content=b"".join(_chunks(4096)), headers=json_)
    sent = _chunks(4097) if chunked else b"".join(_chunks(4097))
    over = app.client.post(path, content=sent, headers=json_)

    assert fits.status_code == 200
    message = (
        "the request body is over the gateway's limit of 4096 bytes "
        "(AVOCADO_INFER_MAX_BODY_BYTES): send smaller or fewer images"
    )
    assert (over.status_code, over.json()) == (413, shape(message))
    assert len(app.fake.published) == 1


def test_the_body_limit_is_the_fleets_job_limit_unless_set(served: Serve) -> None:
    app = served()
    limit = app.fake.settings.fleet.max_request_bytes
    response = app.client.post("/api/generate", content=b"".join(_chunks(limit + 1)))
    assert response.status_code == 413
    assert f"limit of {limit} bytes" in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
    ],
)
def test_model_management_is_refused_in_ollamas_shape(
    served: Serve, method: str, path: str
) -> None:
    app = served()
    response = app.client.request(method, path, json={"model": MODEL})
    what = path.removeprefix("/api/")
    assert (response.status_code, response.json()) == (
        403,
        {
            "error": f"{what} is not offered by this fleet: models are managed on its nodes "
            "(each node's server pulls and keeps its own); /api/tags lists the models they serve"
        },
    )
    assert app.client.get(path).status_code == 405
