"""An in-memory stand-in for avocado-infer's ``Gateway``, put in its place with
``app.dependency_overrides``: the methods the routes call, on scripted token streams, recording
what was published and cancelled. A response shape is checked in milliseconds, with no broker,
Redis, database or worker. What needs those stays in the real-service tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Message

from avocado_infer import InferSettings, create_app
from avocado_infer.deps import app_gateway
from avocado_infer.errors import ModelNotServed
from avocado_infer.gateway import ServedModel, StoredAnswer
from avocado_infer.job_state import JobState, JobView, unknown_job, unknown_summary
from avocado_infer.ledger import Noted
from avocado_infer.limits import Slot
from avocado_infer.metrics import GatewayMetrics
from avocado_shared.contracts import (
    EmbedRequest,
    GenerateRequest,
    JobResult,
    SummarizeRequest,
    ToolCall,
    Usage,
    validate_request,
)
from avocado_shared.keys import ApiKey
from avocado_shared.routing import canonical_model
from avocado_shared.streams import (
    StreamEntry,
    StreamTimedOut,
    StreamUnavailable,
    done_fields,
    error_fields,
    parse_entry,
    restart_fields,
    text_fields,
)

__all__ = [
    "MODEL",
    "STREAMED",
    "USAGE",
    "Blip",
    "Called",
    "Failure",
    "FakeGateway",
    "Handle",
    "Restart",
    "Script",
    "Served",
    "Step",
    "events",
    "leave",
    "ndjson",
    "serve",
]


MODEL = "llama3.2:1b"
# An answer's usage, its durations in ms chosen to show each one's conversion.
_DURATIONS_MS = {
    "total_duration_ms": 12.5,
    "load_duration_ms": 1.25,
    "prompt_eval_duration_ms": 2.0,
    "eval_duration_ms": 8.0,
}
USAGE = Usage(
    model=MODEL, done_reason="stop", prompt_tokens=7, completion_tokens=3, **_DURATIONS_MS
)
# Each test of an answer, streamed and whole.
STREAMED = pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])


@dataclass(frozen=True)
class Restart:
    """A restart entry: the answer starts over (a redelivered job its server cannot continue)."""

    reason: str = "redelivered"


@dataclass(frozen=True)
class Failure:
    """An error entry: the job failed for good (``refused``: its server refused the
    request)."""

    reason: str = "the model crashed"
    refused: bool = False


@dataclass(frozen=True)
class Called:
    """The final entry of an answer in which the model called tools."""

    usage: Usage
    tool_calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class Blip:
    """Redis fails the read here (``StreamUnavailable``), once; the steps after it are what
    the stream holds once Redis is back."""

    reason: str = "Connection closed by server"


Step = str | Restart | Usage | Called | Failure | Blip
"""A text piece, a restart, the final entry (its ``Usage``, or ``Called`` with tool calls), an
error entry, or a Redis blip."""


@dataclass
class Script:
    """One job's token stream as its worker writes it, and its stored result (a generation's
    answer, or a whole result such as an embedding's; an exception: the job failed for good).
    A script that ends without a final entry is a job that stops writing: a read waits its
    timeout, then ``StreamTimedOut``."""

    steps: Sequence[Step] = ()
    stored: StoredAnswer | JobResult | Exception | None = None


@dataclass(frozen=True)
class Handle:
    """A published job, as the routes use ``JobHandle``: its id."""

    id: str


class _ScriptedStream:
    """A job's token stream read as ``AsyncJobStream`` reads Redis: entry ids ``<n>-0``
    (``n``: the step's place, from 1), each blip raised once."""

    def __init__(self, job_id: str, script: Script) -> None:
        self.job_id = job_id
        self.script = script
        self._blipped: set[int] = set()

    async def entries(
        self, after: str = "0-0", timeout_s: float = 60.0
    ) -> AsyncIterator[StreamEntry]:
        steps = self.script.steps
        for index in range(int(after.split("-")[0]), len(steps)):
            step = steps[index]
            if isinstance(step, Blip):
                if index not in self._blipped:
                    self._blipped.add(index)
                    raise StreamUnavailable(
                        f"the token stream of job {self.job_id} is not readable: {step.reason}"
                    )
                continue
            entry = _entry(f"{index + 1}-0", step)
            yield entry
            if entry.final:
                return
        await anyio.sleep(timeout_s)  # XREAD blocks: nothing more is written
        raise StreamTimedOut(f"no entry in stream for job {self.job_id} in {timeout_s}s")


def _entry(entry_id: str, step: str | Restart | Usage | Called | Failure) -> StreamEntry:
    """``step`` as a worker writes it to Redis and a reader parses it back."""
    if isinstance(step, str):
        fields = text_fields(step)
    elif isinstance(step, Restart):
        fields = restart_fields(step.reason)
    elif isinstance(step, Usage):
        fields = done_fields(step)
    elif isinstance(step, Called):
        fields = done_fields(step.usage, tool_calls=step.tool_calls)
    else:
        fields = error_fields(step.reason, step.refused)
    return parse_entry(entry_id, fields)


class FakeGateway:
    """``Gateway``'s public methods in memory. Each generation takes the next of ``answers``
    (jobs ``job-1``, ``job-2``, ...); ``failing`` names a method and what it raises
    (``generate``: a ``PublishError``, ``QueueFull`` or ``ModelNotServed``, ``admit``:
    ``OverLimit``, ``key``: a ``RedisError``, ...)."""

    def __init__(self, settings: InferSettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.answers: list[Script] = []
        self.failing: dict[str, Exception] = {}
        self.keys: dict[str, ApiKey] = {}  # by secret
        self.served: list[ServedModel] = []
        self.views: dict[str, JobView] = {}
        self.summaries: dict[str, tuple[JobView, dict[str, Any] | None]] = {}
        # Job id -> the names of the keys it belongs to (``owner``, not in ``published``).
        self.owners: dict[str, set[str]] = {}
        self.problems: dict[str, str] = {}
        # What the routes did.
        self.published: list[dict[str, Any]] = []
        self.summarized: list[SummarizeRequest] = []
        self.cancelled: list[str] = []
        self.secrets_checked: list[str] = []
        self.held: set[Slot] = set()
        self.released: list[Slot] = []
        self._scripts: dict[str, Script] = {}
        self._made = 0

    def _fail(self, method: str) -> None:
        error = self.failing.get(method)
        if error is not None:
            raise error

    def _new_id(self) -> str:
        self._made += 1
        return f"job-{self._made}"

    def script(
        self, *steps: Step, stored: StoredAnswer | JobResult | Exception | None = None
    ) -> None:
        """Answer the next job with ``steps`` (and ``stored`` as its stored result)."""
        self.answers.append(Script(steps, stored))

    async def generate(self, **fields: Any) -> Handle:
        """Validate as the producer does (``InvalidRequest``), then publish: record the fields
        and take the next scripted answer."""
        self._fail("generate")
        job = {k: v for k, v in fields.items() if k not in ("lane", "owner")}
        validate_request(GenerateRequest, {**job, "options": dict(job.get("options") or {})})
        return self._publish(fields)

    async def embed(self, input: Any, **fields: Any) -> Handle:
        """``generate``'s for an embedding: the fields recorded with their ``input``."""
        self._fail("embed")
        job = {k: v for k, v in fields.items() if k not in ("lane", "owner")}
        options = dict(job.get("options") or {})
        validate_request(EmbedRequest, {**job, "input": input, "options": options})
        return self._publish({"input": input, **fields})

    def _publish(self, fields: dict[str, Any]) -> Handle:
        if not self.answers:
            raise AssertionError(f"a job was published with no answer scripted: {fields}")
        job_id = self._own(self._new_id(), fields.get("owner"))
        self.published.append({k: v for k, v in fields.items() if k != "owner"})
        self._scripts[job_id] = self.answers.pop(0)
        return Handle(job_id)

    def _own(self, job_id: str, owner: str | None) -> str:
        if owner is not None:
            self.owners.setdefault(job_id, set()).add(owner)
        return job_id

    async def summarize(self, request: SummarizeRequest, owner: str | None = None) -> Handle:
        self._fail("summarize")
        self.summarized.append(request)
        return Handle(self._own(self._new_id(), owner))

    async def owned_by(self, job_id: str, owner: str) -> bool:
        self._fail("owned_by")
        return owner in self.owners.get(job_id, set())

    async def cancel(self, job_id: str) -> None:
        self._fail("cancel")
        self.cancelled.append(job_id)

    def stream(self, job_id: str) -> _ScriptedStream:
        return _ScriptedStream(job_id, self._scripts[job_id])

    async def stored(self, job_id: str) -> StoredAnswer | None:
        self._fail("stored")
        stored = self._scripts[job_id].stored
        if isinstance(stored, Exception):
            raise stored
        if isinstance(stored, JobResult):
            return StoredAnswer("", stored.usage())
        return stored

    async def result(self, job_id: str) -> JobResult | None:
        self._fail("result")
        stored = self._scripts[job_id].stored
        if isinstance(stored, Exception):
            raise stored
        return stored if isinstance(stored, JobResult) else None

    async def key(self, secret: str) -> ApiKey | None:
        self.secrets_checked.append(secret)
        self._fail("key")
        return self.keys.get(secret)

    async def admit(self, key: ApiKey) -> Slot | None:
        self._fail("admit")
        if not key.concurrency:
            return None
        slot = Slot(f"slots:{key.name}", f"slot-{len(self.held) + len(self.released) + 1}")
        self.held.add(slot)
        return slot

    async def release(self, slot: Slot) -> None:
        self.held.remove(slot)
        self.released.append(slot)

    async def job(self, job_id: str, noted: Noted | None = None) -> JobView:
        self._fail("job")
        if job_id in self.views:
            return self.views[job_id]
        if noted is not None:
            return JobView(job_id, JobState.QUEUED, noted.kind, noted.share_id, attempts=0)
        raise unknown_job(job_id)

    async def summary(self, share_id: str) -> tuple[JobView, dict[str, Any] | None]:
        self._fail("summary")
        if share_id not in self.summaries:
            raise unknown_summary(share_id)
        return self.summaries[share_id]

    async def models(self) -> list[ServedModel]:
        self._fail("models")
        return list(self.served)

    async def model(self, name: str) -> ServedModel:
        self._fail("models")
        found = [m for m in self.served if m.name == canonical_model(name)]
        if not found:
            raise ModelNotServed(f"model {name!r} not found: no live node serves it")
        return found[0]

    async def unready(self) -> dict[str, str]:
        return dict(self.problems)


@dataclass
class Served:
    """An app on a ``FakeGateway``, and a ``TestClient`` on it (its lifespan, which would
    make the real gateway, never runs)."""

    app: FastAPI
    fake: FakeGateway
    client: TestClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = TestClient(self.app)


def serve(**fields: Any) -> Served:
    """``create_app`` on ``InferSettings(**fields)`` (no keys asked for and a stream timeout of
    a quarter second unless given) with a ``FakeGateway`` as its gateway."""
    settings = InferSettings(**{"require_keys": False, "stream_timeout_s": 0.25, **fields})
    app = create_app(settings)
    fake = FakeGateway(settings)
    app.dependency_overrides[app_gateway] = lambda: fake
    return Served(app, fake)


def ndjson(body: bytes) -> list[dict[str, Any]]:
    """An NDJSON body's objects; every line must be one."""
    lines = body.decode().split("\n")
    if lines[-1] != "":
        raise AssertionError(f"an NDJSON body must end with a newline: {body!r}")
    return [json.loads(line) for line in lines[:-1]]


def events(body: bytes) -> list[Any]:
    """A server-sent events body's data, parsed (``"[DONE]"`` as is); every event must be one
    ``data:`` line."""
    blocks = body.decode().split("\n\n")
    if blocks[-1] != "":
        raise AssertionError(f"an event stream must end with a blank line: {body!r}")
    data = []
    for block in blocks[:-1]:
        if not block.startswith("data: ") or "\n" in block:
            raise AssertionError(f"not one data line: {block!r}")
        text = block.removeprefix("data: ")
        data.append(text if text == "[DONE]" else json.loads(text))
    return data


async def leave(app: FastAPI, path: str, body: Mapping[str, Any], after_pieces: int) -> list[bytes]:
    """POST ``body`` to ``app`` as a server would, and disconnect (``http.disconnect``, as
    uvicorn tells an app) once ``after_pieces`` non-empty body parts came or the response
    ended; the status (``b"200"``) and the parts, once the app has returned. ``TestClient``
    cannot: closing its response cancels the app instead."""
    gone = anyio.Event()
    asked = False
    got: list[bytes] = []

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": json.dumps(body).encode()}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            got.append(str(message["status"]).encode())
        elif message["type"] == "http.response.body":
            if message.get("body"):
                got.append(message["body"])
            if not message.get("more_body", False):
                gone.set()  # the response is whole: the client's leaving is no news
        if len(got) > after_pieces:
            gone.set()

    if after_pieces == 0:
        gone.set()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    with anyio.fail_after(5):
        await app(scope, receive, send)
    return got
