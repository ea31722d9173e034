"""Token streams on the machine's Redis: the worker's writer, the shared reader."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from avocado_shared.contracts import Usage
from avocado_shared.streams import (
    EntryKind,
    JobStream,
    StreamEntry,
    StreamFailed,
    StreamTimedOut,
    StreamUnavailable,
    done_fields,
    error_fields,
    restart_fields,
    text_fields,
)
from ollama_worker import token_stream
from ollama_worker.token_stream import TokenStream
from tests.services import REDIS_URL, RedisServer, free_port


@pytest.fixture(params=[False, True], ids=["bytes", "str"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A client answering bytes, as the worker's is, or str, as a gateway's may be."""
    made = redis.Redis.from_url(REDIS_URL, decode_responses=request.param)
    yield made
    made.close()


@pytest.fixture
def stream(client: redis.Redis) -> Iterator[JobStream]:
    made = JobStream(client, f"avocado-test-{uuid.uuid4().hex[:8]}:", uuid.uuid4().hex)
    yield made
    client.delete(made.key)


def _write(stream: JobStream, *entries: dict[str, str]) -> None:
    for fields in entries:
        stream.client.xadd(stream.key, fields)  # type: ignore[arg-type]


def test_the_reader_ends_at_the_final_entry_with_its_usage(stream: JobStream) -> None:
    _write(
        stream,
        text_fields("Hello"),
        text_fields(", world"),
        done_fields(Usage(model="m", completion_tokens=2)),
    )
    _write(stream, text_fields("after the end"))

    entries = list(stream.entries(timeout_s=5))

    assert [e.kind for e in entries] == [EntryKind.TEXT, EntryKind.TEXT, EntryKind.DONE]
    assert entries[-1].usage == Usage(model="m", completion_tokens=2)
    assert stream.text(timeout_s=5) == "Hello, world"


def test_the_reader_resumes_after_an_entry_id(stream: JobStream) -> None:
    _write(stream, text_fields("one "), text_fields("two "), text_fields("three"))
    _write(stream, done_fields(Usage(model="m")))
    first, second, *_ = stream.entries(timeout_s=5)

    rest = list(stream.entries(after=first.id, timeout_s=5))

    assert rest[0] == second
    assert stream.text(after=first.id, timeout_s=5) == "two three"


def test_the_reader_blocks_until_the_writer_appends(stream: JobStream) -> None:
    got: list[StreamEntry] = []
    first = threading.Event()

    def read() -> None:
        for entry in stream.entries(timeout_s=30):
            got.append(entry)
            first.set()

    reader = threading.Thread(target=read)
    reader.start()
    writer = TokenStream(stream.client, stream.key, ttl_s=60)
    writer.append("first")

    assert first.wait(30)  # read while the stream is still open
    assert got == [StreamEntry(got[0].id, EntryKind.TEXT, text="first", chunks=1)]
    writer.append(" second")
    writer.close(done_fields(Usage(model="m", completion_tokens=2)))
    reader.join(30)
    assert [e.text for e in got] == ["first", " second", ""]
    assert got[-1].kind is EntryKind.DONE


def test_the_writer_sets_the_ttl_and_keeps_every_chunk_in_order(stream: JobStream) -> None:
    writer = TokenStream(stream.client, stream.key, ttl_s=120)
    pieces = [f" w{i}" for i in range(300)]
    for piece in pieces:
        writer.append(piece)
    writer.append("")  # nothing to send: left out
    writer.close(done_fields(Usage(model="m")))

    snapshot = stream.snapshot()
    assert snapshot.text == "".join(pieces)
    assert snapshot.chunks == 300
    assert snapshot.end is not None
    assert snapshot.end.kind is EntryKind.DONE
    assert 0 < int(stream.client.ttl(stream.key)) <= 120


class _LostReply(redis.Redis):
    """A client whose next write Redis applies but whose answer never arrives, as when a
    Redis that is shutting down takes a pipeline and closes the connection."""

    lose_next = False

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        made = super().pipeline(transaction, shard_hint)
        applied = made.execute

        def execute(raise_on_error: bool = True) -> Any:
            replies = applied(raise_on_error)
            if self.lose_next:
                self.lose_next = False
                raise redis.ConnectionError("Connection closed by server.")
            return replies

        made.execute = execute  # type: ignore[method-assign]
        return made


def test_a_write_redis_took_before_the_connection_broke_is_not_written_twice(
    stream: JobStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(token_stream, "_BURST_S", 0.0)  # each piece its own write
    client = _LostReply.from_url(REDIS_URL)
    writer = TokenStream(client, stream.key, ttl_s=60)
    writer.last_id = stream.snapshot().last_id  # as TokenStreams.open learns it
    writer.append("Fern ")  # written
    client.lose_next = True
    writer.append("umber ")  # taken by Redis, its answer lost: the writer sees a failure
    writer.append("candle")  # kept for the end
    writer.close(done_fields(Usage(model="m")))
    client.close()

    snapshot = stream.snapshot()
    assert snapshot.text == "Fern umber candle"
    assert snapshot.end is not None
    assert snapshot.end.kind is EntryKind.DONE


def test_the_writer_keeps_other_entries_in_their_place_among_chunks(stream: JobStream) -> None:
    writer = TokenStream(stream.client, stream.key, ttl_s=120)
    for i in range(100):
        writer.append(f" old{i}")
    writer.add(restart_fields("cannot continue"))
    for i in range(100):
        writer.append(f" new{i}")
    writer.close(done_fields(Usage(model="m")))

    snapshot = stream.snapshot()
    assert snapshot.text == "".join(f" new{i}" for i in range(100))
    assert snapshot.chunks == 100


def test_an_entry_may_join_several_chunks_and_counts_them(stream: JobStream) -> None:
    _write(
        stream, text_fields("One"), text_fields(" two three four", 3), done_fields(Usage(model="m"))
    )

    first, second, _ = stream.entries(timeout_s=5)

    assert (first.chunks, second.chunks) == (1, 3)
    snapshot = stream.snapshot()
    assert (snapshot.text, snapshot.chunks) == ("One two three four", 4)


def test_a_restart_voids_the_text_before_it(stream: JobStream) -> None:
    _write(stream, text_fields("Half an ans"), restart_fields("cannot continue"))
    _write(stream, text_fields("A whole answer."), done_fields(Usage(model="m")))

    assert stream.text(timeout_s=5) == "A whole answer."
    snapshot = stream.snapshot()
    assert (snapshot.text, snapshot.chunks) == ("A whole answer.", 1)


def test_a_failed_job_ends_its_stream_with_the_reason(stream: JobStream) -> None:
    _write(stream, text_fields("Some"), error_fields("JobTimedOut: past 2s"))

    with pytest.raises(StreamFailed, match="JobTimedOut: past 2s"):
        stream.text(timeout_s=5)
    snapshot = stream.snapshot()
    assert snapshot.end is not None
    assert snapshot.end.reason == "JobTimedOut: past 2s"


def test_a_silent_stream_times_out(stream: JobStream) -> None:
    _write(stream, text_fields("stalled"))

    with pytest.raises(StreamTimedOut):
        list(stream.entries(timeout_s=0.2))


def test_an_empty_snapshot_of_a_stream_not_written_yet(stream: JobStream) -> None:
    snapshot = stream.snapshot()

    assert (snapshot.text, snapshot.chunks, snapshot.last_id, snapshot.end) == ("", 0, "0-0", None)


def test_redis_down_is_unavailable_to_readers_and_harmless_to_the_writer() -> None:
    down = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    stream = JobStream(down, "avocado-test:", "job")

    with pytest.raises(StreamUnavailable):
        stream.snapshot()
    with pytest.raises(StreamUnavailable):
        list(stream.entries(timeout_s=5))
    writer = TokenStream(down, stream.key, ttl_s=60)
    writer.append("lost")
    writer.close(done_fields(Usage(model="m")))  # returns: the job goes on


def test_what_a_writer_could_not_write_goes_with_its_end(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
        writer = TokenStream(client, "avocado-test:stream:job", ttl_s=60)
        writer.append("one")
        server.stop()
        writer.append(" two")  # fails: kept
        writer.append(" three")
        server.start()  # from its append-only file
        writer.close(done_fields(Usage(model="m", completion_tokens=3)))

        snapshot = JobStream(client, "avocado-test:", "job").snapshot()
        client.close()
    assert snapshot.text == "one two three"  # no gap before the end
    assert snapshot.chunks == 3
    assert snapshot.end is not None
    assert snapshot.end.usage == Usage(model="m", completion_tokens=3)
