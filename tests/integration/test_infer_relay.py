"""The gateway's reading of real Redis streams written as a worker writes them: text pieces
then the counts, restarts, failures, and how an SSE answer ends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import pytest
import redis
import redis.asyncio

from avocado_infer.answer import SSE
from avocado_infer.errors import AnswerRestarted
from avocado_infer.gateway import StoredAnswer
from avocado_infer.ollama_api import ollama_counts
from avocado_infer.reading import Ending, answer_pieces, whole_answer
from avocado_shared.contracts import FunctionCall, ToolCall, Usage
from avocado_shared.errors import AvocadoError
from avocado_shared.streams import (
    AsyncJobStream,
    StreamFailed,
    StreamTimedOut,
    done_fields,
    error_fields,
    restart_fields,
    stream_key,
    text_fields,
)
from tests.services import REDIS_URL

MODEL = "llama3.2:1b"
USAGE = Usage(
    model=MODEL,
    done_reason="length",
    prompt_tokens=7,
    completion_tokens=3,
    total_duration_ms=12.5,
    load_duration_ms=0.25,
    prompt_eval_duration_ms=1.0,
    eval_duration_ms=10.000001,
)
_T = TypeVar("_T")


@dataclass
class Stream:
    """A job's stream, written as a worker writes it and read as the gateway does: with an
    asyncio Redis client on an event loop of its own."""

    client: redis.Redis
    key_prefix: str
    job_id: str
    stored: StoredAnswer | None = None  # what the job's worker stored

    def write(self, *entries: dict[str, str]) -> None:
        for fields in entries:
            self.client.xadd(stream_key(self.key_prefix, self.job_id), fields)  # type: ignore[arg-type]

    def read(self, how: Callable[[_Reader], Awaitable[_T]]) -> _T:
        async def run() -> _T:
            client = redis.asyncio.Redis.from_url(REDIS_URL)
            try:
                job_stream = AsyncJobStream(client, self.key_prefix, self.job_id)
                return await how(_Reader(job_stream, self.stored))
            finally:
                await client.aclose()

        return anyio.run(run)


@dataclass
class _Reader:
    """What the reading asks of a gateway: the job's stream and its stored answer."""

    job_stream: AsyncJobStream
    answer: StoredAnswer | None

    def stream(self, job_id: str) -> AsyncJobStream:
        assert job_id == self.job_stream.job_id
        return self.job_stream

    async def stored(self, job_id: str) -> StoredAnswer | None:
        return self.answer


@pytest.fixture
def stream(key_prefix: str) -> Iterator[Stream]:
    """A job's stream of this test only, deleted after it."""
    client = redis.Redis.from_url(REDIS_URL)
    made = Stream(client, key_prefix, uuid.uuid4().hex)
    yield made
    client.delete(stream_key(key_prefix, made.job_id))
    client.close()


async def _all(items: AsyncIterator[_T]) -> list[_T]:
    return [item async for item in items]


def _chunks(stream: Stream) -> list[dict[str, Any]]:
    async def chunks(reader: _Reader) -> list[dict[str, Any]]:
        made: list[dict[str, Any]] = []
        try:
            async for piece in answer_pieces(reader, stream.job_id, MODEL, timeout_s=5):  # type: ignore[arg-type]
                made.append(
                    {"done": piece.usage.completion_tokens}
                    if isinstance(piece, Ending)
                    else {"text": piece}
                )
        except AvocadoError as error:
            made.append({"error": type(error).__name__})
        return made

    return stream.read(chunks)


def _whole(stream: Stream) -> tuple[str, Ending]:
    return stream.read(lambda reader: whole_answer(reader, stream.job_id, MODEL, timeout_s=5))  # type: ignore[arg-type]


def _whole_text(stream: Stream) -> str:
    """The answer as stored, once its stream is done."""
    stream.write(done_fields(USAGE))
    return _whole(stream)[0]


def test_pieces_then_the_counts_in_ollamas_units(stream: Stream) -> None:
    stream.write(text_fields("Avo"), text_fields("ca", 2), text_fields("do"), done_fields(USAGE))

    *texts, end = stream.read(
        lambda reader: _all(answer_pieces(reader, stream.job_id, MODEL, timeout_s=5))  # type: ignore[arg-type]
    )

    assert texts == ["Avo", "ca", "do"]
    assert end == Ending(USAGE)
    assert ollama_counts(USAGE) == {
        "done_reason": "length",
        "total_duration": 12_500_000,
        "load_duration": 250_000,
        "prompt_eval_count": 7,
        "prompt_eval_duration": 1_000_000,
        "eval_count": 3,
        "eval_duration": 10_000_001,
    }


def test_a_restart_before_any_text_is_invisible(stream: Stream) -> None:
    stream.write(restart_fields("no continuation"), text_fields("Hi"), done_fields(USAGE))

    assert _chunks(stream) == [{"text": "Hi"}, {"done": 3}]


def test_a_restart_after_text_was_given_ends_the_answer_in_an_error(stream: Stream) -> None:
    stream.write(text_fields("Half"), restart_fields("worker lost"), text_fields("New"))

    assert _chunks(stream) == [{"text": "Half"}, {"error": AnswerRestarted.__name__}]
    assert _whole_text(stream) == "New"


def test_a_failed_job_ends_the_answer_in_an_error(stream: Stream) -> None:
    stream.write(text_fields("Par"), error_fields("OllamaRejected: no"))

    assert _chunks(stream) == [{"text": "Par"}, {"error": StreamFailed.__name__}]
    with pytest.raises(StreamFailed, match="OllamaRejected: no"):
        _whole(stream)


def test_a_stream_that_lost_entries_ends_from_the_stored_answer(stream: Stream) -> None:
    # Redis lost " lost" (its last writes before it died); the end says 13 characters.
    stream.write(text_fields("Avo"), text_fields("cado"), done_fields(USAGE, length=13))
    stream.stored = StoredAnswer("Avocado lost.", USAGE)

    assert _chunks(stream) == [{"text": "Avo"}, {"text": "cado"}, {"text": " lost."}, {"done": 3}]
    assert _whole(stream) == ("Avocado lost.", Ending(USAGE))


def test_the_tool_calls_come_whole_with_the_end(stream: Stream) -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="weather", arguments='{"a": 1}'))
    stream.write(text_fields("Let me see."), done_fields(USAGE, length=11, tool_calls=[call]))

    assert _whole(stream) == ("Let me see.", Ending(USAGE, (call,)))


def test_lost_entries_take_the_tool_calls_from_the_stored_answer(stream: Stream) -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="weather", arguments="{}"))
    stream.write(text_fields("Let"), done_fields(USAGE, length=11, tool_calls=[call]))
    stream.stored = StoredAnswer("Let me see.", USAGE, (call,))

    assert _whole(stream) == ("Let me see.", Ending(USAGE, (call,)))


def test_a_stream_as_long_as_its_end_says_is_whole(stream: Stream) -> None:
    stream.write(text_fields("Avo"), text_fields("cado"), done_fields(USAGE, length=7))
    stream.stored = StoredAnswer("not read: the stream is whole", USAGE)

    assert _chunks(stream) == [{"text": "Avo"}, {"text": "cado"}, {"done": 3}]


def test_no_entry_in_time_is_a_timeout(stream: Stream) -> None:
    with pytest.raises(StreamTimedOut):
        stream.read(
            lambda reader: anext(answer_pieces(reader, stream.job_id, MODEL, timeout_s=0.2))
        )  # type: ignore[arg-type]


async def _body(chunks: list[dict[str, Any]]) -> bytes:
    async def given() -> AsyncIterator[dict[str, Any]]:
        for chunk in chunks:
            yield chunk

    return b"".join([part async for part in SSE.frame(given())])


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([{"n": 1}], b'data: {"n":1}\n\ndata: [DONE]\n\n'),
        (
            [{"n": 1}, {"error": {"message": "x"}}],
            b'data: {"n":1}\n\ndata: {"error":{"message":"x"}}\n\n',
        ),
    ],
)
def test_server_sent_events_end_in_done_unless_an_error(
    chunks: list[dict[str, Any]], events: bytes
) -> None:
    assert anyio.run(_body, chunks) == events
