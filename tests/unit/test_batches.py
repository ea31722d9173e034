"""A batch's record as the ``openai`` SDK reads it (its own ``Batch`` model) in each status, and
the checks of a batch's file, line by line, with no service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from kombu.connection import Connection
from openai.types import Batch as SDKBatch

from avocado_infer.batches import FINAL, Batch, BatchStore, batch_of_job, line_job_id, validate_file
from avocado_infer.dead_lines import DeadLines
from avocado_infer.files import FileStore

CHAT = "/v1/chat/completions"


def _batch(**fields: object) -> Batch:
    return Batch(
        id="batch_1", endpoint=CHAT, input_file_id="file-1", created_at=10, expires_at=20, **fields
    )


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing", *FINAL])
def test_the_record_is_the_sdks_batch_in_every_status(status: str) -> None:
    batch = _batch(total=3, completed=2, failed=1, metadata={"k": "v"}).moved(status)

    read = SDKBatch.model_validate(batch.to_json())

    assert read.status == status
    assert read.request_counts is not None
    assert (read.request_counts.total, read.request_counts.completed) == (3, 2)
    assert read.metadata == {"k": "v"}
    stamp = {"in_progress": read.in_progress_at, "completed": read.completed_at}.get(status)
    assert stamp is None or stamp >= batch.created_at


def test_a_cancel_asked_reads_cancelling_until_the_batch_ends() -> None:
    running, ended = _batch().moved("in_progress"), _batch().moved("completed")

    assert running.to_json(cancel_asked=True)["status"] == "cancelling"
    assert ended.to_json(cancel_asked=True)["status"] == "completed"


def test_failed_checks_are_the_sdks_errors() -> None:
    errors = [{"code": "invalid_json_line", "message": "m", "param": None, "line": 2}]

    read = SDKBatch.model_validate(_batch(errors=errors).moved("failed").to_json())

    assert read.errors is not None
    assert read.errors.data is not None
    assert [(e.code, e.line) for e in read.errors.data] == [("invalid_json_line", 2)]


def test_a_lines_job_is_one_per_custom_id() -> None:
    assert line_job_id("batch_1", "a") == line_job_id("batch_1", "a")
    assert len({line_job_id("batch_1", "a"), line_job_id("batch_1", "b")}) == 2
    assert line_job_id("batch_1", "a") != line_job_id("batch_2", "a")
    assert batch_of_job(line_job_id("batch_1-x", "a")) == "batch_1-x"
    assert batch_of_job("3f1c6b9e-5f0e-4d1c-9a57-2b1f0e8c7d6a") is None


def _file(tmp_path: Path, lines: list[bytes]) -> tuple[FileStore, str]:
    store = FileStore(tmp_path)
    file_id = store.new_id()
    written = store.uploading(file_id) / "in.jsonl"
    written.write_bytes(b"\n".join(lines) + b"\n")
    store.commit(file_id, written, "in.jsonl", "batch", None)
    return store, file_id


def _line(custom_id: str | None, **fields: object) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {}} | fields
    return json.dumps({k: v for k, v in line.items() if v is not None}).encode()


class _Seen:
    """What ``SeenIds`` answers, from a dict; and the size of each chunk it was asked."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.asked: list[int] = []

    def first_lines(self, chunk: list[tuple[str, int]]) -> list[int | None]:
        self.asked.append(len(chunk))
        found = []
        for custom_id, line in chunk:
            found.append(self.lines.get(custom_id))
            self.lines.setdefault(custom_id, line)
        return found


def test_a_good_file_counts_its_requests_and_skips_blank_lines(tmp_path: Path) -> None:
    store, file_id = _file(tmp_path, [_line("a"), b"", _line("b"), b"  "])

    assert validate_file(store, file_id, CHAT, _Seen().first_lines) == (2, [])


def test_every_bad_line_is_named_with_its_number(tmp_path: Path) -> None:
    store, file_id = _file(
        tmp_path,
        [
            _line("a"),
            b"[1, 2]",
            _line(None),
            _line("a"),
            _line("b", method="GET"),
            _line("c", url="/v1/embeddings"),
            _line("d", body="text"),
        ],
    )

    total, errors = validate_file(store, file_id, CHAT, _Seen().first_lines)

    assert total == 7
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_method", "method"),
        (6, "mismatched_endpoint", "url"),
        (7, "invalid_request", "body"),
    ]


def test_an_empty_file_fails(tmp_path: Path) -> None:
    store, file_id = _file(tmp_path, [b""])

    assert validate_file(store, file_id, CHAT, _Seen().first_lines)[1][0]["code"] == "empty_file"


def test_ids_are_checked_a_chunk_at_a_time_and_the_first_errors_kept_in_order(
    tmp_path: Path,
) -> None:
    lines = [_line(f"r{i}") for i in range(2500)]
    lines[2100] = _line("r7")  # line 2101 repeats line 8, two chunks on
    lines += [b"{bad"] * 150
    store, file_id = _file(tmp_path, lines)
    seen = _Seen()

    total, errors = validate_file(store, file_id, CHAT, seen.first_lines)

    assert total == 2650
    assert max(seen.asked) == 1000
    assert errors[0]["line"] == 2101
    assert errors[0]["code"] == "duplicate_custom_id"
    assert "'r7'" in errors[0]["message"]
    assert "first on line 8" in errors[0]["message"]
    assert len(errors) == 100
    assert [e["line"] for e in errors[1:]] == list(range(2501, 2600))


def test_dead_lines_without_a_broker_note_nothing_and_try_again_later() -> None:
    tries: list[Connection] = []

    def connect() -> Connection:
        tries.append(Connection("amqp://guest:guest@127.0.0.1:1//", connect_timeout=0.2))
        return tries[-1]

    dead = DeadLines(connect, BatchStore(redis.Redis(port=1), "test:", retention_s=60))

    assert (dead.heard(), dead.heard()) == (0, 0)
    assert len(tries) == 2  # the broken connection was dropped, a new one tried
