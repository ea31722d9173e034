"""The durable results table ``ml_results``: one row per job identity, written as an upsert.

SQLAlchemy Core over SQLite (a file, by default) or PostgreSQL (by URL, psycopg 3); Alembic
migrates it (``migrate``, run by workers on start and by ``avocado db upgrade``). Reading never
creates a table, so a reader needs no right to.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from avocado_shared import _schema
from avocado_shared._database import WRITES, Encoded, dump_json, make_engine
from avocado_shared._schema import SCHEMA_VERSION, ml_results
from avocado_shared.contracts import JobKind, Usage
from avocado_shared.errors import AvocadoError, PermanentError, Unavailable

if TYPE_CHECKING:
    from avocado_shared.settings import Settings

__all__ = [
    "SCHEMA_VERSION",
    "JobStatus",
    "ResultRow",
    "ResultStore",
    "StoreError",
    "StoreRejected",
    "StoreUnavailable",
    "job_key",
]

# Any fixed 64-bit number: serializes migrations of every process on one PostgreSQL database.
_MIGRATION_LOCK_KEY = 0x617663_6D6C72  # "avc" "mlr"
# The columns a row keeps of its job's usage (the rest stays in its result).
_USAGE = {"model", "prompt_tokens", "completion_tokens", "total_duration_ms", "eval_duration_ms"}
_NO_SCHEMA = "ml_results has no schema yet: run `avocado db upgrade` (workers do on start)"


class StoreError(AvocadoError):
    """Anything the result store refuses or cannot do: one of the two below."""


class StoreUnavailable(StoreError, Unavailable):
    """The database cannot be reached or opened; a retry later may succeed."""


class StoreRejected(StoreError, PermanentError):
    """The store refuses for good: a bad URL, no schema yet, a newer schema, a result that
    is not JSON."""


class JobStatus(str, Enum):
    """Where a job stands; the ``status`` column."""

    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class ResultRow:
    """One row of ``ml_results``; times are timezone-aware UTC."""

    job_key: str
    job_id: str
    task_type: str
    share_id: str | None
    status: JobStatus
    result: dict[str, Any] | None
    error: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_duration_ms: float | None
    eval_duration_ms: float | None
    worker: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime


def job_key(task_type: str | JobKind, job_id: str, share_id: str | None = None) -> str:
    """A job's row identity: a summary, or an embedding of a shared item, is one row per
    shared item; a generation, or an embedding of no item, one per job.

    A summary without a share id (its payload was invalid) gets a row of its own job id, so
    its failure is stored too.
    """
    kind = task_type.value if isinstance(task_type, JobKind) else task_type
    if kind in (JobKind.SUMMARIZE.value, JobKind.EMBED.value) and share_id:
        return f"{kind}:{share_id}"
    return f"{kind}:{job_id}"


def _database_url(url: str) -> sa.URL:
    """``url`` as SQLAlchemy's, PostgreSQL on psycopg 3 and a ``password=`` parameter moved
    into the URL, where ``render_as_string`` hides it."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreRejected("unparsable database URL: use postgresql:// or sqlite:///") from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        password = parsed.query.get("password")
        if isinstance(password, str):
            parsed = parsed.set(password=password).difference_update_query(["password"])
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StoreRejected(f"SQLite URL needs a file: sqlite:///path, got {url!r}")
        return parsed.set(drivername="sqlite")
    shown = parsed.render_as_string(hide_password=True)
    raise StoreRejected(f"unsupported database URL {shown!r}: use postgresql:// or sqlite:///")


class ResultStore:
    """``ml_results`` through one SQLAlchemy engine; thread-safe, and each forked child gets a
    pool of its own."""

    def __init__(self, url: sa.URL) -> None:
        """Use ``open`` or ``from_settings``; nothing connects until the first query."""
        self._url = url
        self._engine = make_engine(url)
        self._writer = self._engine.execution_options(**{WRITES: True})
        # Where the database returns what an upsert wrote (SQLite 3.35 on, PostgreSQL), a
        # write refused (the job succeeded already) is known without a read.
        self._returns = bool(self._engine.dialect.insert_returning)
        self._upsert = _upsert(self._engine.dialect.name, self._returns)
        self._closed = False
        self._lock_pid, self._write_lock = os.getpid(), threading.Lock()

    @classmethod
    def open(cls, url: str) -> ResultStore:
        """``postgresql://``/``postgres://`` (``+driver`` allowed) or ``sqlite:///path``."""
        return cls(_database_url(url))

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStore:
        """The database of ``AVOCADO_DATABASE_URL``, else the SQLite file ``sqlite_path``."""
        if settings.database_url is not None and settings.database_url.get_secret_value():
            return cls.open(settings.database_url.get_secret_value())
        path = settings.sqlite_path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(sa.URL.create("sqlite", database=path))

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def __repr__(self) -> str:
        return f"ResultStore({self._url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's connections; those a forked child inherited are left alone."""
        self._closed = True
        self._engine.dispose()

    # --- schema ---

    def migrate(self) -> None:
        """``alembic upgrade head``, adopting a database made before Alembic; idempotent, and
        safe when many processes start at once (PostgreSQL: an advisory lock; SQLite: the
        write lock). A schema found current is left alone without loading Alembic (some
        8 MB a worker would keep)."""
        if self.schema_version() == SCHEMA_VERSION:
            return
        from alembic.util import CommandError

        with self._errors(), self._writer.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            try:
                _schema.upgrade(conn)
            except CommandError as error:  # e.g. a revision newer than this code knows
                raise StoreRejected(f"{self!r}: cannot upgrade the schema: {error}") from None

    def schema_version(self) -> int:
        """The schema version the database is at; 0 before the first ``migrate``."""
        with self._errors(), self._engine.connect() as conn:
            return _schema.version(conn)

    # --- writes ---

    def record(
        self,
        *,
        job_key: str,
        job_id: str,
        task_type: str | JobKind,
        share_id: str | None,
        status: JobStatus,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        usage: Usage | None = None,
        worker: str | None = None,
    ) -> bool:
        """Upsert the job's row, never a second one; each ``STARTED`` of the same job is one more
        attempt (a retry or a redelivery), a new job on the row starts again at one. The usage
        columns come from ``usage``. False when the row refused the write: a late word of a
        job that succeeded (known only where the database returns what it wrote)."""
        now = datetime.now(timezone.utc)
        values = {
            "job_key": job_key,
            "job_id": job_id,
            "task_type": task_type.value if isinstance(task_type, JobKind) else str(task_type),
            "share_id": share_id,
            "status": JobStatus(status).value,
            # Encoded here, so a bad result fails before any SQL runs, and only once.
            "result": None if result is None else _encoded(result),
            "error": error,
            **(usage.model_dump(include=_USAGE) if usage else dict.fromkeys(_USAGE)),
            "worker": worker,
            "attempts": 1,
            "created_at": now,
            "updated_at": now,
        }
        with self._one_writer(), self._errors(), self._writer.begin() as conn:
            written = conn.execute(self._upsert, values)
            return not self._returns or written.first() is not None

    def start(
        self,
        *,
        job_key: str,
        job_id: str,
        task_type: str | JobKind,
        share_id: str | None,
        worker: str | None,
    ) -> dict[str, Any] | None:
        """Count one more attempt of the job (its ``STARTED``), unless it succeeded already:
        then its stored result, the row left as it is. One statement, where the database
        returns what an upsert wrote; a read first where it cannot."""
        if not self._returns and (done := self.succeeded(job_id)) is not None:
            return done
        if self.record(
            job_key=job_key,
            job_id=job_id,
            task_type=task_type,
            share_id=share_id,
            status=JobStatus.STARTED,
            worker=worker,
        ):
            return None
        return self.succeeded(job_id)

    # --- reads ---

    def get(self, job_id: str) -> ResultRow | None:
        """The row of a job, by its Celery job id."""
        rows = self._select(_BY_JOB_ID, {"job_id": job_id})
        return rows[0] if rows else None

    def succeeded(self, job_id: str) -> dict[str, Any] | None:
        """The stored result of ``job_id`` if it succeeded; None otherwise."""
        row = self.get(job_id)
        if row is None or row.status is not JobStatus.SUCCESS:
            return None
        return row.result

    def get_many(self, job_ids: Collection[str]) -> list[ResultRow]:
        """The rows of the jobs ``job_ids`` that have one, in one query (a batch's window)."""
        if not job_ids:
            return []
        return self._select(sa.select(ml_results).where(ml_results.c.job_id.in_(list(job_ids))))

    def get_by_key(self, job_key: str) -> ResultRow | None:
        """The row of a job identity (see ``job_key``)."""
        rows = self._select(sa.select(ml_results).where(ml_results.c.job_key == job_key))
        return rows[0] if rows else None

    def recent(self, limit: int = 20, status: JobStatus | None = None) -> list[ResultRow]:
        """The latest rows, newest update first, optionally of one status."""
        c = ml_results.c
        query = sa.select(ml_results).order_by(c.updated_at.desc(), c.job_key).limit(limit)
        if status is not None:
            query = query.where(c.status == JobStatus(status).value)
        return self._select(query)

    def count(self) -> int:
        """How many rows ``ml_results`` holds."""
        with self._errors(), self._engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(ml_results)) or 0)

    def _select(
        self, query: sa.Select[Any], params: dict[str, Any] | None = None
    ) -> list[ResultRow]:
        with self._errors(), self._engine.connect() as conn:
            return [_row(r) for r in conn.execute(query, params).mappings()]

    def _one_writer(self) -> contextlib.AbstractContextManager[object]:
        """On SQLite, this process's writers one at a time: waiting on SQLite's write lock,
        a writer sleeps 1, 2, 5, 10... ms between tries instead of waking when it frees (a
        p99 of 24 ms with 16 threads writing), where a lock of the process's own wakes the
        next at once. A forked child gets a new one: its parent's may be held."""
        if self.dialect != "sqlite":
            return contextlib.nullcontext()
        if self._lock_pid != os.getpid():
            self._lock_pid, self._write_lock = os.getpid(), threading.Lock()
        return self._write_lock

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place the driver's errors become the store's, the password scrubbed: an
        unreachable database or a lost connection is ``StoreUnavailable``."""
        if self._closed:
            raise StoreRejected(f"{self!r} is closed")
        try:
            yield
        except sa.exc.DBAPIError as error:
            detail = str(error.orig)
            if self._url.password:
                detail = detail.replace(str(self._url.password), "***")
            if _is_missing_table(error):
                raise StoreRejected(f"{self!r}: {_NO_SCHEMA}") from None
            if isinstance(error, sa.exc.OperationalError) or error.connection_invalidated:
                raise StoreUnavailable(f"{self!r}: {detail}") from None
            raise StoreRejected(f"{self!r}: {detail}") from None


def _encoded(value: Mapping[str, Any]) -> Encoded:
    try:
        return Encoded(dump_json(dict(value)))
    except (TypeError, ValueError) as error:
        message = f"result is not plain JSON (use model_dump(mode='json')): {error}"
        raise StoreRejected(message) from None


def _upsert(dialect: str, returns: bool) -> sa.Executable:
    """The upsert of one row, its values given when it runs: made once per store, as building
    it (the ``excluded`` columns) costs several times what SQLite takes to run it. With
    ``returns``, it returns the row's key when the row took the write."""
    insert = postgresql.insert(ml_results) if dialect == "postgresql" else sqlite.insert(ml_results)
    upsert = insert.on_conflict_do_update(
        index_elements=["job_key"], set_=_update(insert.excluded), where=_not_final(insert.excluded)
    )
    return upsert.returning(ml_results.c.job_key) if returns else upsert


_BY_JOB_ID = (
    sa.select(ml_results)
    .where(ml_results.c.job_id == sa.bindparam("job_id"))
    .order_by(ml_results.c.updated_at.desc())
    .limit(1)
)


def _update(new: sa.ColumnCollection[str, Any]) -> dict[str, Any]:
    """The upsert's SET: a redelivery of the same job counts one more attempt and keeps
    created_at; a new job for the same key (a summary re-run) takes the row over and starts
    counting again."""
    old = ml_results.c
    attempts = sa.case(
        (old.job_id != new.job_id, 1),
        (new.status == JobStatus.STARTED.value, old.attempts + 1),
        else_=old.attempts,
    )
    kept = ("job_key", "attempts", "created_at")
    return {"attempts": attempts, **{c.name: new[c.name] for c in old if c.name not in kept}}


def _not_final(new: sa.ColumnCollection[str, Any]) -> sa.ColumnElement[bool]:
    """The upsert's WHERE: a job's SUCCESS is final. A copy of it that was turned away while
    it ran (its RETRY), or any late word of the same job, leaves the row as it is."""
    old = ml_results.c
    success = JobStatus.SUCCESS.value
    return sa.not_(sa.and_(old.job_id == new.job_id, old.status == success, new.status != success))


def _is_missing_table(error: sa.exc.DBAPIError) -> bool:
    if getattr(error.orig, "sqlstate", None) == "42P01":  # PostgreSQL: undefined_table
        return True
    return "no such table" in str(error.orig)  # SQLite says it only in words


def _row(r: sa.RowMapping) -> ResultRow:
    result = r["result"]
    if result is not None and not isinstance(result, dict):
        raise StoreRejected(f"stored result is not a JSON object: {type(result).__name__}")
    return ResultRow(**{**r, "status": JobStatus(r["status"]), "result": result})
