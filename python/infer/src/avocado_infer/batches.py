"""OpenAI's batches as the fleet keeps them: a ``Batch`` record (OpenAI's Batch object and what
the feeder needs: how far it has read its file), its store in Redis, the checks of its input
file before anything is queued, and what each line becomes (a job) and gives back (a line of
the output or error file).

Records live in Redis, as the gateway's ledger does, so every gateway sees each batch and
the one holding its lease (``batch_runner``) moves it on; the input and output are files
(``files``). A line's job id is derived from the batch and the line's ``custom_id``, so a
line fed twice (a feeder that restarts) is one job, found again by that id in ``ml_results``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

import redis
from pydantic import BaseModel, ValidationError

from avocado_infer.embed_api import OpenAIEmbeddingsBody
from avocado_infer.errors import describe
from avocado_infer.files import FileStore
from avocado_infer.openai_api import ChatBody, CompletionBody, answer_body
from avocado_shared.contracts import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InvalidRequest,
)
from avocado_shared.errors import NotFound
from avocado_shared.producer import Producer

__all__ = [
    "FINAL",
    "Batch",
    "BatchStore",
    "Endpoint",
    "FirstLines",
    "Line",
    "SeenIds",
    "UnknownBatch",
    "batch_of_job",
    "line_job_id",
    "read_line",
    "validate_file",
]

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("failed", "completed", "expired", "cancelled")
WINDOW_S = 24 * 3600
_MAX_ERRORS = 100  # errors.data of a failed validation lists at most this many


class UnknownBatch(NotFound):
    """No batch of this id that the caller may see (404)."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No batch found with id '{batch_id}'")


@dataclass
class Batch:
    """OpenAI's Batch object's fields, and the feeder's: ``owner`` (the key's name),
    ``cursor`` (lines fed) and ``offset`` (their bytes in the file), ``ending`` (why it stops
    early: ``batch_cancelled`` or ``batch_expired``)."""

    id: str
    endpoint: str
    input_file_id: str
    created_at: int
    expires_at: int
    owner: str | None = None
    metadata: dict[str, str] | None = None
    status: str = "validating"
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cursor: int = 0
    offset: int = 0
    ending: str | None = None
    times: dict[str, int] = field(default_factory=dict)

    def to_json(self, cancel_asked: bool = False) -> dict[str, Any]:
        """OpenAI's Batch object; ``cancelling`` as soon as a cancel is asked for."""
        status = self.status
        times = dict(self.times)
        if cancel_asked and status in OPEN and status != "finalizing":
            status = "cancelling"
        stamps = ("in_progress", "finalizing", "completed", "failed", "expired")
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{f"{name}_at": times.get(name) for name in stamps},
            "cancelling_at": times.get("cancelling"),
            "cancelled_at": times.get("cancelled"),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }

    def moved(self, status: str) -> Batch:
        """This batch in ``status``, stamped now."""
        return replace(self, status=status, times={**self.times, status: int(time.time())})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def line_job_id(batch_id: str, custom_id: str) -> str:
    """The job of a batch's line: one per ``custom_id``, however often it is fed."""
    return f"{batch_id}-{hashlib.sha256(custom_id.encode()).hexdigest()[:24]}"


def batch_of_job(job_id: str) -> str | None:
    """The batch whose line ``job_id`` is (``line_job_id``); None for any other job."""
    batch_id, _, digest = job_id.rpartition("-")
    return batch_id if batch_id.startswith("batch_") and len(digest) == 24 else None


class BatchStore:
    """Batch records in Redis: ``{prefix}batch:<id>`` (JSON), the index ``{prefix}batches``
    (by creation time), the open ones ``{prefix}batches:open``, a batch's cancel flag, its
    lines' jobs not yet ended (``:running``), the lines the job contract refused
    (``:refused``, custom id -> why) and those whose jobs were dead-lettered (``:dead``, job
    id -> why). An ended batch's record expires ``retention_s`` later;
    its index entry goes when a listing finds the record gone."""

    def __init__(self, client: redis.Redis, key_prefix: str, retention_s: int) -> None:
        self.client = client
        self.prefix = key_prefix
        self.retention_s = retention_s

    def key(self, batch_id: str, part: str = "") -> str:
        return f"{self.prefix}batch:{batch_id}{part}"

    def create(
        self, endpoint: str, input_file_id: str, owner: str | None, metadata: dict[str, str] | None
    ) -> Batch:
        now = int(time.time())
        batch = Batch(
            id=f"batch_{secrets.token_hex(12)}",
            endpoint=endpoint,
            input_file_id=input_file_id,
            created_at=now,
            expires_at=now + WINDOW_S,
            owner=owner,
            metadata=metadata,
        )
        with self.client.pipeline() as pipe:
            pipe.set(self.key(batch.id), json.dumps(asdict(batch)))
            pipe.zadd(f"{self.prefix}batches", {batch.id: time.time()})  # newest first, to the µs
            pipe.sadd(f"{self.prefix}batches:open", batch.id)
            pipe.execute()
        return batch

    def save(self, batch: Batch) -> None:
        """Write the record; an ended batch's expires, it leaves the open ones, its feeder's
        keys deleted."""
        if batch.status not in FINAL:
            self.client.set(self.key(batch.id), json.dumps(asdict(batch)))
        else:
            parts = (":running", ":refused", ":dead", ":cancel", ":lease")
            with self.client.pipeline() as pipe:
                pipe.set(self.key(batch.id), json.dumps(asdict(batch)), ex=self.retention_s)
                pipe.srem(f"{self.prefix}batches:open", batch.id)
                pipe.delete(*(self.key(batch.id, part) for part in parts))
                pipe.execute()

    def load(self, batch_id: str) -> Batch | None:
        raw = self.client.get(self.key(batch_id))
        return None if raw is None else Batch(**json.loads(raw))

    def get(self, batch_id: str, owner: str | None, admin: bool) -> Batch:
        """The batch ``batch_id``; ``UnknownBatch`` when there is none the caller may see."""
        batch = self.load(batch_id)
        if batch is None or not (owner is None or admin or batch.owner == owner):
            raise UnknownBatch(batch_id)
        return batch

    def open_ids(self) -> list[str]:
        return sorted(_text(m) for m in self.client.smembers(f"{self.prefix}batches:open"))

    def open_of(self, owner: str) -> int:
        """How many open batches the key named ``owner`` has."""
        found = (self.load(batch_id) for batch_id in self.open_ids())
        return sum(1 for batch in found if batch is not None and batch.owner == owner)

    def newest(self, owner: str | None, admin: bool) -> Iterator[Batch]:
        """The batches the caller may see, newest first; one past its retention leaves the
        index."""
        index = f"{self.prefix}batches"
        for member in self.client.zrevrange(index, 0, -1):
            batch_id = _text(cast(bytes, member))
            batch = self.load(batch_id)
            if batch is None:
                self.client.zrem(index, batch_id)
            elif owner is None or admin or batch.owner == owner:
                yield batch

    def members(self, batch_id: str, part: str) -> list[str]:
        """The members of the batch's set ``part`` (``:running``)."""
        return [_text(m) for m in self.client.smembers(self.key(batch_id, part))]

    def take(self, batch_id: str, part: str, job_ids: list[str]) -> list[bool]:
        """Take ``job_ids`` out of the batch's set ``part`` in one round trip: which of them
        were in it (whoever takes a job out counts it, so it is counted once)."""
        if not job_ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.srem(self.key(batch_id, part), job_id)
            return [bool(removed) for removed in pipe.execute()]

    def note_dead(self, batch_id: str, job_id: str, reason: str) -> None:
        """The line's job was dead-lettered: why (kept no longer than the batch's window)."""
        with self.client.pipeline() as pipe:
            pipe.hset(self.key(batch_id, ":dead"), job_id, reason)
            pipe.expire(self.key(batch_id, ":dead"), 2 * WINDOW_S)
            pipe.execute()

    def dead(self, batch_id: str) -> dict[str, str]:
        """The batch's lines' jobs that were dead-lettered, and why."""
        found = self.client.hgetall(self.key(batch_id, ":dead"))
        return {_text(job_id): _text(why) for job_id, why in found.items()}

    def reasons(self, batch_id: str, part: str, fields: list[str]) -> list[str | None]:
        """Why each of ``fields`` is in the batch's hash ``part`` (``:refused``, ``:dead``);
        None where it is not."""
        found = self.client.hmget(self.key(batch_id, part), fields)
        return [None if why is None else _text(why) for why in found]

    def ask_cancel(self, batch_id: str) -> None:
        self.client.set(self.key(batch_id, ":cancel"), "1")

    def cancel_asked(self, batch_id: str) -> bool:
        return bool(self.client.exists(self.key(batch_id, ":cancel")))


@dataclass(frozen=True)
class Line:
    """One request of a batch's file: its ``custom_id`` and its body."""

    custom_id: str
    body: dict[str, Any]

    def job(self, producer: Producer, endpoint: str, job_id: str) -> GenerateRequest | EmbedRequest:
        """The line's job, its ``idempotency_key`` its job id (a line fed twice while its job
        runs is that job); ``InvalidRequest`` when the job contract refuses the body."""
        try:
            if endpoint == "/v1/embeddings":
                embedding = OpenAIEmbeddingsBody.model_validate(self.body)
                fields = embedding.job()
                return producer.embed_request(embedding.texts(), idempotency_key=job_id, **fields)
            generation: BaseModel = (
                ChatBody if endpoint == "/v1/chat/completions" else CompletionBody
            ).model_validate(self.body)
            job: dict[str, Any] = generation.job()  # type: ignore[attr-defined]
            prompt = job.pop("prompt", None)
            return producer.generate_request(prompt, idempotency_key=job_id, **job)
        except ValidationError as error:
            raise InvalidRequest(describe(error.errors())) from None

    def answer(self, endpoint: str, job_id: str, result: GenerateResult | EmbedResult) -> Any:
        """The body the endpoint answers the line with, in its OpenAI shape."""
        if isinstance(result, EmbedResult):
            return OpenAIEmbeddingsBody.model_validate(self.body).answer(result)
        model = str(self.body.get("model", result.model))
        return answer_body(endpoint == "/v1/chat/completions", job_id, model, result)


def read_line(raw: bytes) -> Line:
    """A line of a checked file (``validate_file``)."""
    data = json.loads(raw)
    return Line(data["custom_id"], data.get("body") or {})


# The custom ids of this many lines are checked for repeats at once (one Redis round trip).
_ID_CHUNK = 1000
FirstLines = Callable[[list[tuple[str, int]]], list[int | None]]
"""Given a chunk of ``(custom_id, line)`` in file order, the line each id was first seen on
(earlier in the file or the chunk), None for an id seen the first time."""


class SeenIds:
    """The custom ids a file's check has seen, in a Redis hash (a digest of each id -> the
    line it was first on) that expires: the gateway holds one chunk of ids at a time, never
    the file's, whatever its size. Deleted when the check ends."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: int = 3600) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s

    def first_lines(self, chunk: list[tuple[str, int]]) -> list[int | None]:
        digests = [hashlib.sha256(custom_id.encode()).digest()[:16] for custom_id, _ in chunk]
        with self.client.pipeline(transaction=False) as pipe:
            for digest, (_, line) in zip(digests, chunk, strict=True):
                pipe.hsetnx(self.key, digest, line)
            pipe.expire(self.key, self.ttl_s)
            added = pipe.execute()[:-1]
        repeated = [digest for digest, new in zip(digests, added, strict=True) if not new]
        firsts: dict[bytes, Any] = {}
        if repeated:
            firsts = dict(zip(repeated, self.client.hmget(self.key, repeated), strict=True))
        return [None if new else int(firsts[d]) for d, new in zip(digests, added, strict=True)]

    def __enter__(self) -> SeenIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.delete(self.key)


def validate_file(
    files: FileStore, file_id: str, endpoint: str, first_lines: FirstLines
) -> tuple[int, list[dict[str, Any]]]:
    """The number of requests in the file and what is wrong with it, by line, read a line at a
    time: bad JSON, a missing or repeated ``custom_id`` (``first_lines`` says, a chunk of ids
    at a time), a ``method`` other than POST, a ``url`` other than the batch's ``endpoint``.
    At most ``_MAX_ERRORS`` are kept: the first ones."""
    errors: list[dict[str, Any]] = []
    chunk_errors: list[dict[str, Any]] = []
    ids: list[tuple[str, int]] = []
    total = 0

    def wrong(code: str, message: str, line: int, param: str | None = None) -> None:
        chunk_errors.append({"code": code, "message": message, "param": param, "line": line})

    def checked() -> None:
        """Check the chunk's ids, then keep its errors in line order."""
        for (custom_id, number), first in zip(ids, first_lines(ids) if ids else [], strict=True):
            if first is not None:
                message = (
                    f"The custom_id '{custom_id}' is used more than once in this file "
                    f"(first on line {first})."
                )
                wrong("duplicate_custom_id", message, number, "custom_id")
        errors.extend(sorted(chunk_errors, key=lambda error: error["line"]))
        del errors[_MAX_ERRORS:]
        chunk_errors.clear()
        ids.clear()

    with files.path(file_id).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if len(ids) + len(chunk_errors) >= _ID_CHUNK:
                checked()
            total += 1
            try:
                data = json.loads(raw)
            except ValueError:
                wrong("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            if not isinstance(data, dict):
                wrong("invalid_json_line", "This line is not a JSON object.", number)
                continue
            custom_id = data.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                wrong("missing_required_parameter", "custom_id is required.", number, "custom_id")
            else:
                ids.append((custom_id, number))
            if data.get("method") != "POST":
                wrong("invalid_method", "Only POST is supported.", number, "method")
            if data.get("url") != endpoint:
                wrong(
                    "mismatched_endpoint",
                    f"The url of this line, {data.get('url')!r}, is not the batch's endpoint "
                    f"{endpoint}.",
                    number,
                    "url",
                )
            if not isinstance(data.get("body"), dict):
                wrong("invalid_request", "body: an object is required.", number, "body")
    if total == 0:
        wrong("empty_file", "The input file holds no requests.", 0)
    checked()
    return total, errors
