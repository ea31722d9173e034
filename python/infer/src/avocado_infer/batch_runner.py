"""What moves batches on: a task of every gateway that, for each open batch whose lease it
holds (a Redis key with an expiry, so a gateway that dies hands its batches to another within
``_LEASE_S``), checks the input file, feeds its lines into the batch lane as jobs a window at a
time, counts the jobs that ended, and writes the output and error files at the end.

Flow control: at most ``AVOCADO_INFER_BATCH_WINDOW`` lines of a batch are queued or running at
once, none while the lane's queue is at ``AVOCADO_INFER_MAX_QUEUE``, and the producer refuses
while the broker blocks publishing (the line is fed again later, as the same job). Progress is
counted from the window alone (its jobs' rows in ``ml_results``), never by reading every line's
job; the files are read a line at a time, never whole.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import redis
from fastapi.concurrency import run_in_threadpool

from avocado_infer.batches import (
    Batch,
    Line,
    SeenIds,
    line_job_id,
    read_line,
    validate_file,
)
from avocado_infer.batches_api import batch_store
from avocado_infer.dead_lines import DeadLines
from avocado_infer.files import FileStore
from avocado_infer.gateway import Gateway
from avocado_shared.contracts import EmbedRequest, InvalidRequest, JobKind, parse_result
from avocado_shared.errors import AvocadoError
from avocado_shared.jobs import PublishError
from avocado_shared.locks import RELEASE_SCRIPT
from avocado_shared.routing import Lane, canonical_model, lane_queue_name
from avocado_shared.store import JobStatus, ResultRow, StoreError

__all__ = ["BatchRunner"]

logger = logging.getLogger(__name__)

_LEASE_S = 30
# A cancelled or expired batch waits this long for its queued jobs to be seen cancelled by a
# worker; past it, lines still without an answer go to the error file.
_DRAIN_S = 60
_ENDED = (JobStatus.SUCCESS, JobStatus.FAILURE, JobStatus.CANCELLED)
_CHUNK = 256  # lines the end reads the rows of at once
_FINAL_OF = {"batch_cancelled": "cancelled", "batch_expired": "expired"}


class BatchRunner:
    """The batches of the fleet, as far as this gateway moves them."""

    def __init__(self, gateway: Gateway, files: FileStore) -> None:
        self.gateway = gateway
        self.files = files
        settings = gateway.settings
        self.store = batch_store(gateway)
        self.dead = DeadLines(gateway.producer.app.connection_for_read, self.store)
        self.window = settings.batch_window
        self.poll_s = settings.batch_poll_s
        self._token = uuid.uuid4().hex
        self._passing = threading.Lock()  # held by a pass, in its thread
        self._stopping = threading.Event()

    async def running(self) -> None:
        """Move every open batch on, again and again, until cancelled; then, once the pass
        under way has ended, hand this gateway's batches over (their leases released), so
        another gateway goes on with them at once."""
        try:
            while True:
                await run_in_threadpool(self.pass_once)
                await asyncio.sleep(self.poll_s)
        finally:
            self._stopping.set()
            await asyncio.to_thread(self._release)

    def pass_once(self) -> None:
        with self._passing:
            try:
                open_ids = self.store.open_ids()
            except redis.RedisError as error:
                logger.warning("batches not read: %s", error)
                return
            if open_ids:
                self.dead.heard()
            for batch_id in open_ids:
                if self._stopping.is_set():
                    return
                try:
                    if self._lease(batch_id):
                        self.step(batch_id)
                except Exception:  # Redis, the database or the files down: the next pass
                    logger.exception("batch %s not moved on", batch_id)

    def _release(self) -> None:
        with self._passing:
            self.dead.close()
            try:
                for batch_id in self.store.open_ids():
                    key = self.store.key(batch_id, ":lease")
                    self.store.client.eval(RELEASE_SCRIPT, 1, key, self._token)
            except redis.RedisError as error:
                logger.warning("batch leases not released (they expire): %s", error)

    def _lease(self, batch_id: str) -> bool:
        """Hold the batch's lease (take it, or renew ours)."""
        key = self.store.key(batch_id, ":lease")
        client = self.store.client
        if client.set(key, self._token, nx=True, ex=_LEASE_S):
            return True
        if client.get(key) == self._token.encode():
            client.expire(key, _LEASE_S)
            return True
        return False

    def step(self, batch_id: str) -> None:
        """One move of the batch: checked, fed a window, drained, or finished."""
        batch = self.store.load(batch_id)
        if batch is None:
            return
        if not self.files.path(batch.input_file_id).exists():  # deleted under the batch
            self._cancel_running(batch)
            message = f"The input file {batch.input_file_id} was deleted."
            error = {"code": "file_not_found", "message": message, "param": "input_file_id"}
            batch.errors = [{**error, "line": None}]
            self.store.save(batch.moved("failed"))
            return
        if batch.status in ("validating", "in_progress"):
            if self.store.cancel_asked(batch_id):
                batch.ending = "batch_cancelled"
            elif time.time() >= batch.expires_at:
                batch.ending = "batch_expired"
        if batch.ending is not None and batch.status == "validating":  # nothing was queued
            batch = batch.moved(_FINAL_OF[batch.ending])
        elif batch.ending is not None and batch.status == "in_progress":
            batch = batch.moved("cancelling" if batch.ending == "batch_cancelled" else "finalizing")
            self._cancel_running(batch)
        # Each phase goes on to the next in the same step: a checked file is fed at once.
        if batch.status == "validating":
            batch = self._validated(batch)
        if batch.status == "in_progress":
            self._count(batch)
            self._feed(batch)
            if batch.cursor >= batch.total and not self._running(batch):
                batch = batch.moved("finalizing")
        if batch.status in ("cancelling", "finalizing"):
            self._count(batch)
            draining = batch.ending is not None and self._running(batch)
            started = batch.times.get(batch.status, 0)
            if not draining or time.time() - started >= _DRAIN_S:
                batch = self._finished(batch)
        self.store.save(batch)

    def _validated(self, batch: Batch) -> Batch:
        # A key of this check's own: a check another gateway runs at once (a lease lost to a
        # long check) must not see its ids.
        key = self.store.key(batch.id, f":ids:{uuid.uuid4().hex}")
        with SeenIds(self.store.client, key) as seen:
            total, errors = validate_file(
                self.files, batch.input_file_id, batch.endpoint, seen.first_lines
            )
        batch.total = total
        if errors:
            batch.errors = errors
            return batch.moved("failed")
        return batch.moved("in_progress")

    def _running(self, batch: Batch) -> int:
        return int(self.store.client.scard(self.store.key(batch.id, ":running")))

    def _count(self, batch: Batch) -> None:
        """Count the window's jobs that ended: dead-lettered, or with a row in ``ml_results``
        that says so (one query); each kind leaves the window in one round trip."""
        dead = list(self.store.dead(batch.id))
        batch.failed += sum(self.store.take(batch.id, ":running", dead))
        running = self.store.members(batch.id, ":running")
        try:
            rows = self.gateway.producer.results.get_many(running)
        except StoreError as error:  # no worker made its tables yet, or it is down: later
            logger.info("batch %s: its jobs' rows not read now: %s", batch.id, error)
            return
        ended = [row for row in rows if row.status in _ENDED]
        taken = self.store.take(batch.id, ":running", [row.job_id for row in ended])
        for row in (row for row, took in zip(ended, taken, strict=True) if took):
            if row.status is JobStatus.SUCCESS:
                batch.completed += 1
            else:
                batch.failed += 1

    def _cancel_running(self, batch: Batch) -> None:
        for job_id in self.store.members(batch.id, ":running"):
            try:
                self.gateway.producer.cancel(job_id)
            except AvocadoError as error:
                logger.warning("batch %s: job %s not cancelled: %s", batch.id, job_id, error)

    def _feed(self, batch: Batch) -> None:
        """Queue lines until the window is full, the lane's queue is at its limit, or the
        broker refuses; the cursor is saved after each line, so a feeder that restarts feeds
        at most that line again (the same job: its id and idempotency key say so)."""
        room = self.window - self._running(batch)
        if room <= 0 or batch.cursor >= batch.total:
            return
        with self.files.path(batch.input_file_id).open("rb") as handle:
            handle.seek(batch.offset)
            first = True
            while room > 0 and batch.cursor < batch.total:
                raw, offset = _next_request(handle)
                line = read_line(raw)
                if not self._fed(batch, line, check_done=first):
                    return
                first = False
                batch.cursor += 1
                batch.offset = offset
                room -= 1
                self.store.save(batch)

    def _fed(self, batch: Batch, line: Line, check_done: bool) -> bool:
        """Queue one line's job (or note why the contract refuses it); False when it could not
        be queued now."""
        job_id = line_job_id(batch.id, line.custom_id)
        running = self.store.key(batch.id, ":running")
        producer = self.gateway.producer
        try:
            request = line.job(producer, batch.endpoint, job_id)
        except InvalidRequest as error:
            self.store.client.hset(self.store.key(batch.id, ":refused"), line.custom_id, str(error))
            batch.failed += 1
            return True
        if check_done and self._stored(job_id):  # fed before a restart
            self.store.client.sadd(running, job_id)
            return True
        model = canonical_model(request.model or "")
        limit = self.gateway.settings.max_queue
        depth = self.gateway.backlog(model, Lane.BATCH).estimate()
        if limit and depth is not None and depth >= limit:
            return False
        try:
            producer.submit(request, Lane.BATCH, job_id=job_id, watched=False)
        except PublishError as error:
            logger.info("batch %s: line %s not queued now: %s", batch.id, line.custom_id, error)
            return False
        self.gateway.backlog(model, Lane.BATCH).published()
        kind = JobKind.EMBED if isinstance(request, EmbedRequest) else JobKind.GENERATE
        queue = lane_queue_name(model, Lane.BATCH)
        self.gateway.ledger.note(job_id, kind, None, queue, batch.owner)
        self.store.client.sadd(running, job_id)
        return True

    def _stored(self, job_id: str) -> bool:
        """Whether the job has a row; unreadable, it is fed again (the same job: its
        idempotency key keeps it one while it is queued or running)."""
        try:
            return self.gateway.producer.results.get(job_id) is not None
        except StoreError:
            return False

    def _finished(self, batch: Batch) -> Batch:
        """Write the output file (every answer made) and the error file (every other line)."""
        out_id, err_id = self.files.new_id(), self.files.new_id()
        directory = self.files.uploading(out_id)
        counts = {"output": 0, "error": 0}
        out_path, err_path = directory / "output.jsonl", directory / "errors.jsonl"
        requests = _requests(self.files.path(batch.input_file_id))
        with out_path.open("wb") as out, err_path.open("wb") as err:
            # A chunk of lines at a time: their rows in one query, their refusals and dead
            # letters in one read each.
            while lines := [read_line(raw) for raw in itertools.islice(requests, _CHUNK)]:
                ids = [line_job_id(batch.id, line.custom_id) for line in lines]
                rows = {r.job_id: r for r in self.gateway.producer.results.get_many(ids)}
                refusals = self.store.reasons(batch.id, ":refused", [x.custom_id for x in lines])
                deaths = self.store.reasons(batch.id, ":dead", ids)
                for line, job_id, why, died in zip(lines, ids, refusals, deaths, strict=True):
                    kind, record = self._outcome(batch, line, job_id, why, died, rows.get(job_id))
                    (out if kind == "output" else err).write(json.dumps(record).encode() + b"\n")
                    counts[kind] += 1
        if counts["output"]:
            name = f"{batch.id}_output.jsonl"
            batch.output_file_id = self.files.commit(
                out_id, out_path, name, "batch_output", batch.owner
            ).id
        if counts["error"]:
            name = f"{batch.id}_error.jsonl"
            batch.error_file_id = self.files.commit(
                err_id, err_path, name, "batch_output", batch.owner
            ).id
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()
        batch.completed, batch.failed = counts["output"], counts["error"]
        return batch.moved(_FINAL_OF.get(batch.ending or "", "completed"))

    def _outcome(
        self,
        batch: Batch,
        line: Line,
        job_id: str,
        why: str | None,
        died: str | None,
        row: ResultRow | None,
    ) -> tuple[str, dict[str, Any]]:
        """Where a line goes at the end, and its record there: ``why`` the job contract refused
        it, else its job's ``row``, else why its job was dead-lettered (``died``)."""
        head = {"id": f"batch_req_{job_id}", "custom_id": line.custom_id}
        if why is not None:
            return "error", head | _failed(job_id, 400, "invalid_request", why)
        if row is not None and row.status is JobStatus.SUCCESS and row.result is not None:
            answer = line.answer(batch.endpoint, job_id, parse_result(row.result))  # type: ignore[arg-type]
            response = {"status_code": 200, "request_id": job_id, "body": answer}
            return "output", head | {"response": response, "error": None}
        if row is not None and row.status is JobStatus.FAILURE:
            message = f"job {job_id} failed: {row.error}"
            return "error", head | _failed(job_id, 502, "job_failed", message)
        if died is not None:
            message = f"job {job_id} was dead-lettered: {died}"
            return "error", head | _failed(job_id, 500, "job_dead_lettered", message)
        code = batch.ending or "batch_incomplete"
        message = {
            "batch_cancelled": "The batch was cancelled before this request ran.",
            "batch_expired": "The batch expired before this request ran.",
        }.get(code, "This request has no answer.")
        return "error", head | {"response": None, "error": {"code": code, "message": message}}


def _failed(job_id: str, status: int, code: str, message: str) -> dict[str, Any]:
    """An error file's ``response`` (the error the endpoint would have answered) and
    ``error`` of a line that ran and failed, or that the job contract refused (400)."""
    kind = "invalid_request_error" if status == 400 else "server_error"
    body = {"error": {"message": message, "type": kind}}
    return {
        "response": {"status_code": status, "request_id": job_id, "body": body},
        "error": {"code": code, "message": message},
    }


def _next_request(handle: BinaryIO) -> tuple[bytes, int]:
    """The next request's line of a checked file (blank lines skipped) and the offset after
    it."""
    while True:
        raw = handle.readline()
        if raw.strip():
            return raw, handle.tell()


def _requests(path: Path) -> Iterator[bytes]:
    """The requests' lines of a checked file, one at a time."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                yield raw
