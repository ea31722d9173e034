"""What a client sees when Redis fails under its answer, and what a client that leaves does to
its job, on a fake gateway (``tests/fake_gateway.py``). Each blip costs the reader's half
second of backoff."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio
import pytest

from avocado_infer.gateway import StoredAnswer
from avocado_shared.keys import ApiKey
from avocado_shared.streams import StreamFailed
from tests.fake_gateway import MODEL, STREAMED, USAGE, Blip, Served, events, leave, ndjson

Serve = Callable[..., Served]

STORED = StoredAnswer("Hello, world.", USAGE)
OLLAMA = {"model": MODEL, "prompt": "Hi"}
OPENAI = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


def ollama_text(app: Served, stream: bool) -> tuple[str, dict[str, Any]]:
    """The text an Ollama client is given, and the last object."""
    response = app.client.post("/api/generate", json=OLLAMA | {"stream": stream})
    assert response.status_code == 200
    chunks = ndjson(response.content) if stream else [response.json()]
    return "".join(c["response"] for c in chunks), chunks[-1]


def openai_text(app: Served, stream: bool) -> tuple[str, dict[str, Any]]:
    """The text an OpenAI client is given, and the usage it is told (the stream's usage
    chunk, which must come last before ``[DONE]``)."""
    options = {"stream_options": {"include_usage": True}} if stream else {}
    response = app.client.post("/v1/chat/completions", json=OPENAI | {"stream": stream, **options})
    assert response.status_code == 200
    if not stream:
        whole = response.json()
        return whole["choices"][0]["message"]["content"], whole["usage"]
    chunks = events(response.content)
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    return text, chunks[-2]["usage"]


Read = Callable[[Served, bool], tuple[str, dict[str, Any]]]
READERS = pytest.mark.parametrize("read", [ollama_text, openai_text], ids=["ollama", "openai"])
# USAGE as each API's last word tells it.
TOLD = {
    ollama_text: {"eval_count": 3, "prompt_eval_count": 7, "eval_duration": 8_000_000},
    openai_text: {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}


@READERS
@STREAMED
def test_an_answer_finishes_from_its_stored_result_after_redis_fails(
    served: Serve, read: Read, stream: bool
) -> None:
    """The worker's stream writes failed with Redis; it went on and stored the whole answer."""
    app = served()
    app.fake.script("Hel", "lo", Blip(), stored=STORED)
    text, last = read(app, stream)
    assert text == STORED.text
    assert {k: last[k] for k in TOLD[read]} == TOLD[read]


@READERS
@STREAMED
def test_an_answer_reads_on_after_its_last_entry_once_redis_is_back(
    served: Serve, read: Read, stream: bool
) -> None:
    app = served(stream_timeout_s=5)  # longer than the reader's backoff
    app.fake.script("Hel", Blip(), "lo", USAGE)
    text, last = read(app, stream)
    assert text == "Hello"
    assert {k: last[k] for k in TOLD[read]} == TOLD[read]


def test_a_job_whose_stored_result_failed_ends_the_stream_with_an_error_line(
    served: Serve,
) -> None:
    app = served()
    failed = StreamFailed("job job-1 failed: out of memory")
    app.fake.script("Hel", Blip(), stored=failed)
    response = app.client.post("/api/generate", json=OLLAMA)
    assert ndjson(response.content)[-1] == {"error": "job job-1 failed: out of memory"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {**OPENAI, "stream": True}),
        ("/v1/chat/completions", {**OPENAI, "stream": True}),
    ],
    ids=["ollama", "openai"],
)
def test_a_client_that_leaves_mid_stream_cancels_its_job(
    served: Serve, path: str, body: dict[str, Any]
) -> None:
    app = served(stream_timeout_s=30)  # the job stops writing after its first piece
    app.fake.script("Hel")
    sent = anyio.run(leave, app.app, path, body, 1)
    assert (sent[0], len(sent)) == (b"200", 2)
    assert app.fake.cancelled == ["job-1"]


@pytest.mark.parametrize("stream", [True, False], ids=["before-its-first-piece", "whole"])
def test_a_client_that_leaves_before_anything_was_sent_cancels_its_job(
    served: Serve, stream: bool
) -> None:
    app = served(stream_timeout_s=30)  # the job never starts
    app.fake.script()
    sent = anyio.run(leave, app.app, "/api/generate", OLLAMA | {"stream": stream}, 0)
    assert sent == [b"499"]
    assert app.fake.cancelled == ["job-1"]


def test_a_client_that_stays_cancels_nothing(served: Serve) -> None:
    app = served()
    app.fake.script("Hel", "lo", USAGE)
    sent = anyio.run(leave, app.app, "/api/generate", OLLAMA, 99)
    assert (sent[0], len(sent)) == (b"200", 4)
    assert app.fake.cancelled == []


def test_a_blip_before_any_text_finishes_from_the_stored_result(served: Serve) -> None:
    app = served()
    app.fake.script(Blip(), stored=STORED)
    assert ollama_text(app, True)[0] == STORED.text


def test_a_keys_slot_is_held_while_its_answer_streams(served: Serve) -> None:
    app = served(require_keys=True, stream_timeout_s=30)  # the job stops after its first piece
    app.fake.keys["avk_s"] = ApiKey("app", rpm=0, concurrency=1, created_at=datetime.now())
    app.fake.script("Hel")
    auth = {"Authorization": "Bearer avk_s"}
    with app.client.stream("POST", "/api/generate", json=OLLAMA, headers=auth) as response:
        body = response.iter_bytes()  # kept: an iterator dropped closes the response
        assert ndjson(next(body))[0]["response"] == "Hel"
        assert [s.slots for s in app.fake.held] == ["slots:app"]
    assert (app.fake.held, len(app.fake.released)) == (set(), 1)
