"""The durable results table ``ml_results``: one row per job identity, written as an upsert.

SQLite (stdlib) by default, PostgreSQL by URL; the SQL is written once and a tiny dialect object
supplies what differs (placeholders, column types, how JSON and times travel). psycopg is
imported only when a PostgreSQL URL is used, so a producer without it can still use SQLite.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from avocado_shared.contracts import JobKind

if TYPE_CHECKING:
    from avocado_shared.settings import Settings

__all__ = [
    "SCHEMA_VERSION",
    "JobStatus",
    "ResultRow",
    "ResultStore",
    "StoreError",
    "StoreUnavailable",
    "job_key",
]

_T = TypeVar("_T")

_SQLITE_BUSY_TIMEOUT_S = 30.0
_PG_CONNECT_TIMEOUT_S = 10
_APPLICATION_NAME = "avocado-results"
# Any fixed 64-bit number: serializes migrations of every process on one PostgreSQL database.
_MIGRATION_LOCK_KEY = 0x617663_6D6C72  # "avc" "mlr"
# Connections inherited across fork() are kept referenced, never closed or collected in the
# child: finalizing one would end the parent's session (libpq sends Terminate on the socket).
_ABANDONED: list[object] = []


class StoreError(Exception):
    """Anything the result store refuses or cannot do."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or opened; transient, a retry later may succeed."""


class JobStatus(str, Enum):
    """Where a job stands; the ``status`` column."""

    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


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
    """A job's row identity: a summary is one row per shared item, a generation one per job.

    A summary without a share id (its payload was invalid) gets a row of its own job id, so
    its failure is stored too.
    """
    kind = task_type.value if isinstance(task_type, JobKind) else task_type
    if kind == JobKind.SUMMARIZE.value and share_id:
        return f"{kind}:{share_id}"
    return f"{kind}:{job_id}"


# --- dialects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    """What differs between SQLite and PostgreSQL; queries are written once with ``?``."""

    name: str
    placeholder: str
    json_type: str
    time_type: str
    float_type: str

    def sql(self, query: str) -> str:
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)

    def json_param(self, value: Mapping[str, Any] | None) -> object:
        if value is None:
            return None
        text = _dump_json(value)  # checked here, so a bad result fails before any SQL runs
        if self.name == "sqlite":
            return text
        from psycopg.types.json import Jsonb

        return Jsonb(value, dumps=lambda _: text)

    def time_param(self, value: datetime) -> object:
        # Fixed-width ISO text sorts in time order in SQLite; PostgreSQL takes the datetime.
        return value.isoformat(timespec="microseconds") if self.name == "sqlite" else value

    @staticmethod
    def load_json(value: object) -> dict[str, Any] | None:
        if value is None:
            return None
        loaded = json.loads(value) if isinstance(value, (str, bytes)) else value
        if not isinstance(loaded, dict):
            raise StoreError(f"stored result is not a JSON object: {type(loaded).__name__}")
        return loaded

    @staticmethod
    def load_time(value: object) -> datetime:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        if not isinstance(moment, datetime):
            raise StoreError(f"stored time is not a timestamp: {type(value).__name__}")
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)


_SQLITE = _Dialect("sqlite", "?", json_type="TEXT", time_type="TEXT", float_type="REAL")
_POSTGRES = _Dialect(
    "postgresql", "%s", json_type="JSONB", time_type="TIMESTAMPTZ", float_type="DOUBLE PRECISION"
)


def _dump_json(value: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        message = f"result is not plain JSON (use model_dump(mode='json')): {error}"
        raise StoreError(message) from None


# --- schema ------------------------------------------------------------------------------


def _schema_v1(d: _Dialect) -> list[str]:
    return [
        f"""CREATE TABLE ml_results (
            job_key TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            task_type TEXT NOT NULL,
            share_id TEXT,
            status TEXT NOT NULL,
            result {d.json_type},
            error TEXT,
            model TEXT,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            total_duration_ms {d.float_type},
            eval_duration_ms {d.float_type},
            worker TEXT,
            attempts INTEGER NOT NULL DEFAULT 1,
            created_at {d.time_type} NOT NULL,
            updated_at {d.time_type} NOT NULL
        )""",
        "CREATE INDEX ml_results_job_id ON ml_results (job_id)",
        "CREATE INDEX ml_results_status_updated ON ml_results (status, updated_at)",
    ]


# Append a step to change the schema; never edit one that has shipped.
_MIGRATIONS: tuple[Callable[[_Dialect], list[str]], ...] = (_schema_v1,)
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = (
    "job_key, job_id, task_type, share_id, status, result, error, model, prompt_tokens, "
    "completion_tokens, total_duration_ms, eval_duration_ms, worker, attempts, created_at, "
    "updated_at"
)
# A redelivery of the same job counts one more attempt and keeps created_at; a new job for the
# same key (a summary re-run) takes the row over and starts counting again.
_UPSERT = f"""INSERT INTO ml_results ({_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
ON CONFLICT (job_key) DO UPDATE SET
    attempts = CASE WHEN ml_results.job_id <> excluded.job_id THEN 1
        WHEN excluded.status = 'STARTED' THEN ml_results.attempts + 1
        ELSE ml_results.attempts END,
    job_id = excluded.job_id,
    task_type = excluded.task_type,
    share_id = excluded.share_id,
    status = excluded.status,
    result = excluded.result,
    error = excluded.error,
    model = excluded.model,
    prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens,
    total_duration_ms = excluded.total_duration_ms,
    eval_duration_ms = excluded.eval_duration_ms,
    worker = excluded.worker,
    updated_at = excluded.updated_at"""  # noqa: S608 - only constants are interpolated
_SELECT = f"SELECT {_COLUMNS} FROM ml_results"  # noqa: S608 - only constants are interpolated


# --- URLs ------------------------------------------------------------------------------


def _redact(url: str) -> str:
    """The URL with its password (userinfo or ``password=`` parameter) replaced by ``***``."""
    if not _secrets_of(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if has_password else f"{user}@{host}"
    query = "&".join(
        "password=***" if item.split("=", 1)[0].lower() == "password" else item
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets_of(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [parts.password] if parts.password else []
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if key.lower() == "password" and value:
            found.append(value)
    return [s for raw in found for s in {raw, unquote(raw)} if s]


def _scrub(text: str, url: str) -> str:
    for secret in sorted(_secrets_of(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _sqlite_path(url: str) -> str:
    """``sqlite:///relative/file`` or ``sqlite:////absolute/file`` (SQLAlchemy's spelling)."""
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
    if not path:
        raise StoreError(f"SQLite URL needs a file: sqlite:///path, got {_redact(url)!r}")
    return path


# --- the store ------------------------------------------------------------------------------


class ResultStore:
    """``ml_results`` over one connection per process, made lazily and re-made after fork.

    Thread-safe: one lock serializes this process's use of its connection.
    """

    def __init__(self, url: str, *, sqlite_path: str | None = None) -> None:
        """Use ``open`` or ``from_settings``; nothing connects until the first query."""
        self._url = url
        self._sqlite_path = sqlite_path
        self._dialect = _SQLITE if sqlite_path is not None else _POSTGRES
        self._conn: Any = None
        self._pid = 0
        self._lock = threading.Lock()
        self._closed = False
        _STORES.add(self)

    @classmethod
    def open(cls, url: str) -> ResultStore:
        """``postgresql://``/``postgres://`` (``+driver`` allowed) or ``sqlite:///path``."""
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        base = scheme.split("+", 1)[0]
        if base in ("postgresql", "postgres"):
            return cls("postgresql://" + url.partition("://")[2])
        if base == "sqlite":
            return cls(url, sqlite_path=_sqlite_path(url))
        raise StoreError(f"unsupported database URL {_redact(url)!r}: use postgresql:// or sqlite")

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStore:
        """The database of ``AVOCADO_DATABASE_URL``, else the SQLite file ``sqlite_path``."""
        if settings.database_url is not None and settings.database_url.get_secret_value():
            return cls.open(settings.database_url.get_secret_value())
        path = settings.sqlite_path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{path}", sqlite_path=path)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect.name

    def __repr__(self) -> str:
        return f"ResultStore({_redact(self._url)!r})"

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's connection; a connection inherited through fork is left alone."""
        with self._lock:
            self._closed = True
            self._drop_connection()

    # --- schema ---

    def migrate(self) -> None:
        """Create or upgrade the schema; idempotent, and safe when many processes start at once."""

        def run(conn: Any) -> None:
            d = self._dialect
            if d.name == "sqlite":
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS ml_results_schema ("
                    f"version INTEGER PRIMARY KEY, applied_at {d.time_type} NOT NULL)"
                )
                current = self._version(conn)
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"database schema is version {current}, newer than this code's "
                        f"{SCHEMA_VERSION}: upgrade avocado-shared"
                    )
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version - 1](d):
                        conn.execute(statement)
                    conn.execute(
                        d.sql("INSERT INTO ml_results_schema (version, applied_at) VALUES (?, ?)"),
                        (version, d.time_param(_now())),
                    )
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

        self._run(run)

    def schema_version(self) -> int:
        """The schema version the database is at; 0 before the first ``migrate``."""

        def run(conn: Any) -> int:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ml_results_schema'"
                if self._dialect.name == "sqlite"
                else "SELECT to_regclass('ml_results_schema')"
            ).fetchone()
            if exists is None or exists[0] is None:
                return 0
            return self._version(conn)

        return self._run(run)

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
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        total_duration_ms: float | None = None,
        eval_duration_ms: float | None = None,
        worker: str | None = None,
    ) -> None:
        """Upsert the job's row, never a second one; each ``STARTED`` of the same job is one more
        attempt (a retry or a redelivery), a new job on the row starts again at one."""
        d = self._dialect
        now = d.time_param(_now())
        params = (
            job_key,
            job_id,
            task_type.value if isinstance(task_type, JobKind) else str(task_type),
            share_id,
            JobStatus(status).value,
            d.json_param(result),
            error,
            model,
            prompt_tokens,
            completion_tokens,
            total_duration_ms,
            eval_duration_ms,
            worker,
            now,
            now,
        )
        query = d.sql(_UPSERT)

        def run(conn: Any) -> None:
            conn.execute(query, params)
            if d.name != "sqlite":
                conn.commit()

        self._run(run)

    # --- reads ---

    def get(self, job_id: str) -> ResultRow | None:
        """The row of a job, by its Celery job id."""
        rows = self._select("WHERE job_id = ? ORDER BY updated_at DESC LIMIT 1", (job_id,))
        return rows[0] if rows else None

    def get_by_key(self, job_key: str) -> ResultRow | None:
        """The row of a job identity (see ``job_key``)."""
        rows = self._select("WHERE job_key = ?", (job_key,))
        return rows[0] if rows else None

    def recent(self, limit: int = 20, status: JobStatus | None = None) -> list[ResultRow]:
        """The latest rows, newest update first, optionally of one status."""
        if status is None:
            return self._select("ORDER BY updated_at DESC, job_key LIMIT ?", (limit,))
        return self._select(
            "WHERE status = ? ORDER BY updated_at DESC, job_key LIMIT ?",
            (JobStatus(status).value, limit),
        )

    def count(self) -> int:
        """How many rows ``ml_results`` holds."""

        def run(conn: Any) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM ml_results").fetchone()[0])

        return self._run(run)

    # --- internals ---

    def _select(self, clause: str, params: Sequence[object]) -> list[ResultRow]:
        query = self._dialect.sql(f"{_SELECT} {clause}")

        def run(conn: Any) -> list[ResultRow]:
            return [self._row(r) for r in conn.execute(query, params).fetchall()]

        return self._run(run)

    def _version(self, conn: Any) -> int:
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM ml_results_schema").fetchone()
        return int(row[0])

    def _row(self, r: Sequence[Any]) -> ResultRow:
        d = self._dialect
        return ResultRow(
            job_key=r[0],
            job_id=r[1],
            task_type=r[2],
            share_id=r[3],
            status=JobStatus(r[4]),
            result=d.load_json(r[5]),
            error=r[6],
            model=r[7],
            prompt_tokens=r[8],
            completion_tokens=r[9],
            total_duration_ms=None if r[10] is None else float(r[10]),
            eval_duration_ms=None if r[11] is None else float(r[11]),
            worker=r[12],
            attempts=int(r[13]),
            created_at=d.load_time(r[14]),
            updated_at=d.load_time(r[15]),
        )

    def _run(self, operation: Callable[[Any], _T]) -> _T:
        """Run ``operation`` on this process's connection; PostgreSQL reconnects once."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{self!r} is closed")
            if self._dialect.name == "sqlite":
                try:
                    return operation(self._connection())
                except sqlite3.OperationalError as error:
                    if "locked" in str(error) or "busy" in str(error):
                        raise StoreUnavailable(f"{self!r}: {error}") from error
                    raise
            import psycopg

            try:
                return self._run_postgres(operation)
            except psycopg.OperationalError:
                # The server may have restarted: one fresh connection, one more try.
                self._drop_connection()
            try:
                return self._run_postgres(operation)
            except psycopg.OperationalError as error:
                self._drop_connection()
                raise StoreUnavailable(f"{self!r}: {_scrub(str(error), self._url)}") from None

    def _run_postgres(self, operation: Callable[[Any], _T]) -> _T:
        import psycopg

        conn = self._connection()
        try:
            value = operation(conn)
        except psycopg.OperationalError:
            raise
        except BaseException:
            # Leave the session usable: a failed statement aborts the whole transaction.
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()  # a read opened a transaction; hold no snapshot between calls
        return value

    def _connection(self) -> Any:
        if self._conn is not None and self._pid != os.getpid():
            self._forget_parent()
        if self._conn is None:
            self._conn = self._connect()
            self._pid = os.getpid()
        return self._conn

    def _forget_parent(self) -> None:
        """In a forked child: never touch the parent's connection, and start with a free lock."""
        self._lock = threading.Lock()
        if self._conn is not None:
            _ABANDONED.append(self._conn)
            self._conn = None

    def _connect(self) -> Any:
        if self._sqlite_path is not None:
            return self._connect_sqlite(self._sqlite_path)
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            params = conninfo_to_dict(self._url)
            params.setdefault("connect_timeout", _PG_CONNECT_TIMEOUT_S)
            params.setdefault("application_name", _APPLICATION_NAME)
            return psycopg.connect(make_conninfo("", **params), autocommit=False)
        except psycopg.Error as error:
            message = _scrub(str(error), self._url)
            raise StoreUnavailable(f"cannot connect to {self!r}: {message}") from None

    def _connect_sqlite(self, path: str) -> sqlite3.Connection:
        try:
            # isolation_level=None: each write commits on its own, migrate() begins explicitly.
            conn = sqlite3.connect(
                path,
                timeout=_SQLITE_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            # WAL lets readers run beside the one writer; the busy timeout makes writers queue.
            # Switching to WAL ignores the busy timeout when many processes open at once.
            deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as busy:
                    if "locked" not in str(busy) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            # In WAL mode NORMAL syncs at checkpoints, not at each commit: a committed row
            # survives a crashed or killed worker, not a power cut, as Redis's AOF everysec.
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as error:
            where = Path(path).resolve()
            raise StoreUnavailable(f"cannot open SQLite file {where}: {error}") from error
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pid != os.getpid():
            _ABANDONED.append(conn)
            return
        with contextlib.suppress(Exception):  # a broken connection may fail to close
            conn.close()


_STORES: weakref.WeakSet[ResultStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _now() -> datetime:
    return datetime.now(timezone.utc)
