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
from collections.abc import Iterator
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
    "Line",
    "UnknownBatch",
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


class BatchStore:
    """Batch records in Redis: ``{prefix}batch:<id>`` (JSON), the index ``{prefix}batches``
    (by creation time), the open ones ``{prefix}batches:open``, a batch's cancel flag, its
    lines' jobs not yet ended (``:running``) and the lines the job contract refused
    (``:refused``, custom id -> why)."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.prefix = key_prefix

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
            pipe.zadd(f"{self.prefix}batches", {batch.id: now})
            pipe.sadd(f"{self.prefix}batches:open", batch.id)
            pipe.execute()
        return batch

    def save(self, batch: Batch) -> None:
        """Write the record; an ended batch leaves the open ones, its feeder's keys deleted."""
        self.client.set(self.key(batch.id), json.dumps(asdict(batch)))
        if batch.status in FINAL:
            parts = (":running", ":refused", ":cancel", ":lease")
            with self.client.pipeline() as pipe:
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
        """The batches the caller may see, newest first."""
        for batch_id in self.client.zrevrange(f"{self.prefix}batches", 0, -1):
            batch = self.load(_text(cast(bytes, batch_id)))
            if batch is not None and (owner is None or admin or batch.owner == owner):
                yield batch

    def members(self, batch_id: str, part: str) -> list[str]:
        """The members of the batch's set ``part`` (``:running``)."""
        return [_text(m) for m in self.client.smembers(self.key(batch_id, part))]

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


def validate_file(
    files: FileStore, file_id: str, endpoint: str
) -> tuple[int, list[dict[str, Any]]]:
    """The number of requests in the file and what is wrong with it, read a line at a time
    (only its custom ids are held): bad JSON, a missing or duplicate ``custom_id``, a
    ``method`` other than POST, a ``url`` other than the batch's ``endpoint``."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0

    def wrong(code: str, message: str, line: int, param: str | None = None) -> None:
        if len(errors) < _MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    with files.path(file_id).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
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
            elif custom_id in seen:
                wrong(
                    "duplicate_custom_id",
                    f"The custom_id '{custom_id}' is used more than once in this file.",
                    number,
                    "custom_id",
                )
            else:
                seen.add(custom_id)
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
    return total, errors
