"""What the gateway's embedding routes answer, on a fake gateway (``tests/fake_gateway.py``):
Ollama's ``/api/embed`` and ``/api/embeddings``, OpenAI's ``/v1/embeddings`` (floats and
base64), their errors in each API's shape, and the job each request publishes."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from avocado_infer.errors import ModelNotServed, QueueFull
from avocado_shared.contracts import EmbedResult
from tests.fake_gateway import MODEL, USAGE, Failure, Served, leave

Serve = Callable[..., Served]

VECTORS = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]
EMBEDDING = "all-minilm:latest"


def embedded(vectors: list[list[float]] = VECTORS) -> EmbedResult:
    """A stored embedding job's result, with ``USAGE``'s counts and durations."""
    return EmbedResult(
        job_id="job-1",
        worker="w@node",
        embeddings=vectors,
        **USAGE.model_copy(update={"model": EMBEDDING, "completion_tokens": 0}).model_dump(),
    )


def scripted(served: Serve, vectors: list[list[float]] = VECTORS) -> Served:
    app = served()
    app.fake.script(USAGE, stored=embedded(vectors))
    return app


def test_ollama_embed_answers_its_vectors_in_ollamas_shape(served: Serve) -> None:
    app = scripted(served)
    response = app.client.post(
        "/api/embed", json={"model": "all-minilm", "input": ["a cat", "a dog"], "truncate": False}
    )
    assert response.status_code == 200
    assert response.headers["x-avocado-job-id"] == "job-1"
    assert response.json() == {
        "model": "all-minilm",
        "embeddings": VECTORS,
        "total_duration": 12_500_000,
        "load_duration": 1_250_000,
        "prompt_eval_count": 7,
    }
    published = app.fake.published[0]
    assert published["input"] == ["a cat", "a dog"]
    assert (published["model"], published["truncate"], published["lane"].value) == (
        "all-minilm",
        False,
        "interactive",
    )


def test_ollama_embed_of_one_text_and_dimensions_is_one_job(served: Serve) -> None:
    app = scripted(served, VECTORS[:1])
    response = app.client.post(
        "/api/embed", json={"model": "all-minilm", "input": "a cat", "dimensions": 3}
    )
    assert response.json()["embeddings"] == VECTORS[:1]
    assert (app.fake.published[0]["input"], app.fake.published[0]["dimensions"]) == ("a cat", 3)


def test_ollama_embed_of_no_input_answers_no_vector_and_queues_nothing(served: Serve) -> None:
    app = served()
    response = app.client.post("/api/embed", json={"model": "all-minilm", "input": []})
    assert response.json() == {"model": "all-minilm", "embeddings": []}
    assert app.fake.published == []


def test_ollama_embeddings_answers_one_vector(served: Serve) -> None:
    app = scripted(served, VECTORS[:1])
    response = app.client.post("/api/embeddings", json={"model": "all-minilm", "prompt": "a cat"})
    assert response.json() == {"embedding": VECTORS[0]}
    assert app.fake.published[0]["input"] == "a cat"


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_openai_embeddings_answer_in_openais_shape(served: Serve, encoding: str) -> None:
    app = scripted(served)
    response = app.client.post(
        "/v1/embeddings",
        json={"model": "all-minilm", "input": ["a cat", "a dog"], "encoding_format": encoding},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "all-minilm"
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    vectors = [d["embedding"] for d in body["data"]]
    if encoding == "base64":
        vectors = [list(struct.unpack("<3f", base64.b64decode(v))) for v in vectors]
        assert vectors == [pytest.approx(v) for v in VECTORS]
    else:
        assert vectors == VECTORS


def test_openai_embeddings_pass_the_dimensions(served: Serve) -> None:
    app = scripted(served)
    app.client.post("/v1/embeddings", json={"model": "m", "input": "a cat", "dimensions": 2})
    assert app.fake.published[0]["dimensions"] == 2


OPENAI_400 = {"type": "invalid_request_error", "param": None, "code": None}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "m", "input": [1, 2, 3]}, "token arrays are not supported"),
        ({"model": "m", "input": [[1, 2], [3]]}, "token arrays are not supported"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x"}, "model"),
    ],
)
def test_openai_embeddings_refuse_bad_input_with_a_400(
    served: Serve, body: dict[str, Any], says: str
) -> None:
    app = served()
    response = app.client.post("/v1/embeddings", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert says in error["message"]
    assert {k: error[k] for k in OPENAI_400} == OPENAI_400
    assert app.fake.published == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "m", "input": 7}, "input"),
        ({"model": "m", "input": ["a", "  "]}, "input"),
        ({"model": "m", "input": "x", "dimensions": -1}, "dimensions"),
        ({"input": "x"}, "model"),
    ],
)
def test_ollama_embed_refuses_bad_input_with_a_400(
    served: Serve, body: dict[str, Any], says: str
) -> None:
    response = served().client.post("/api/embed", json=body)
    assert response.status_code == 400
    assert says in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/embed", {"model": "nope", "input": "x"}),
        ("/api/embeddings", {"model": "nope", "prompt": "x"}),
        ("/v1/embeddings", {"model": "nope", "input": "x"}),
    ],
)
def test_a_model_no_node_serves_is_a_404_and_a_full_lane_a_503(
    served: Serve, path: str, body: dict[str, Any]
) -> None:
    app = served()
    app.fake.failing["embed"] = ModelNotServed("model 'nope' not found: no live node serves it")
    response = app.client.post(path, json=body)
    assert response.status_code == 404
    assert "no live node serves it" in str(response.json())
    app.fake.failing["embed"] = QueueFull("100 jobs wait", retry_after=5)
    response = app.client.post(path, json=body)
    assert (response.status_code, response.headers["retry-after"]) == (503, "5")


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/embed", {"model": "m", "input": "x"}, lambda m: {"error": m}),
        (
            "/v1/embeddings",
            {"model": "m", "input": "x"},
            lambda m: {
                "error": {"message": m, "type": "server_error", "param": None, "code": None}
            },
        ),
    ],
)
def test_a_failed_job_is_a_502_with_its_reason(
    served: Serve, path: str, body: dict[str, Any], error: Callable[[str], Any]
) -> None:
    app = served()
    app.fake.script(Failure("BackendRejected: too long"))
    response = app.client.post(path, json=body)
    assert response.status_code == 502
    assert response.json() == error("job job-1 failed: BackendRejected: too long")


def test_a_job_that_never_ends_is_a_504(served: Serve) -> None:
    app = served()
    app.fake.script()  # no entry, ever
    response = app.client.post("/api/embed", json={"model": "m", "input": "x"})
    assert response.status_code == 504


def test_a_client_that_leaves_cancels_its_embedding(served: Serve) -> None:
    app = served()
    app.fake.script()  # it waits in the queue
    got = anyio.run(leave, app.app, "/api/embed", {"model": MODEL, "input": "x"}, 0)
    assert got == [b"499"]
    assert app.fake.cancelled == ["job-1"]
