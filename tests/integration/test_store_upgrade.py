"""``ml_results`` made by the store before Alembic upgrades in place, and readers never create a
table: on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

import avocado_shared
from avocado_shared.contracts import JobKind
from avocado_shared.store import SCHEMA_VERSION, JobStatus, ResultStore, StoreError, job_key
from tests.conftest import PG_FAKE_PASSWORD
from tests.services import run_cli, service_env

# The schema as the store before Alembic made it (its _schema_v1 and migrate()), per dialect.
_OLD_TYPES = {
    "sqlite": {"json": "TEXT", "time": "TEXT", "float": "REAL"},
    "postgresql": {"json": "JSONB", "time": "TIMESTAMPTZ", "float": "DOUBLE PRECISION"},
}
_OLD_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ml_results_schema ("
    "version INTEGER PRIMARY KEY, applied_at {time} NOT NULL)",
    """CREATE TABLE ml_results (
        job_key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        task_type TEXT NOT NULL,
        share_id TEXT,
        status TEXT NOT NULL,
        result {json},
        error TEXT,
        model TEXT,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        total_duration_ms {float},
        eval_duration_ms {float},
        worker TEXT,
        attempts INTEGER NOT NULL DEFAULT 1,
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL
    )""",
    "CREATE INDEX ml_results_job_id ON ml_results (job_id)",
    "CREATE INDEX ml_results_status_updated ON ml_results (status, updated_at)",
    "INSERT INTO ml_results_schema (version, applied_at) "
    "VALUES (1, '2026-01-02T03:00:00.000000+00:00')",
]
# Rows as the old store wrote them: on SQLite, times were ISO text and results compact JSON.
_OLD_ROWS = """INSERT INTO ml_results (job_key, job_id, task_type, share_id, status, result,
    error, model, prompt_tokens, completion_tokens, total_duration_ms, eval_duration_ms, worker,
    attempts, created_at, updated_at) VALUES
('generate:old-1', 'old-1', 'generate', NULL, 'SUCCESS', '{"text":"Grüße 🥑","n":[1,2.5]}',
    NULL, 'llama3.2:1b', 12, 34, 1500.5, 900.25, 'worker-old', 2,
    '2026-01-02T03:04:05.123456+00:00', '2026-01-02T03:04:06.000001+00:00'),
('summarize:share-1', 'old-2', 'summarize', 'share-1', 'FAILURE', NULL,
    'OllamaRejected: 400', NULL, NULL, NULL, NULL, NULL, 'worker-old', 1,
    '2026-01-01T00:00:00.000000+00:00', '2026-01-01T00:00:01.000000+00:00')"""
_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def _dialect(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite") else "postgresql"


@contextmanager
def _raw(database_url: str) -> Iterator[Any]:
    """A plain driver connection, autocommitting, that knows nothing of the store."""
    if _dialect(database_url) == "sqlite":
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()
        return
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def _tables(database_url: str) -> set[str]:
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def old_database(database_url: str) -> str:
    """The test's database with the tables and two rows of the store before Alembic."""
    types = _OLD_TYPES[_dialect(database_url)]
    with _raw(database_url) as conn:
        for statement in _OLD_SCHEMA:
            conn.execute(statement.format(**types))
        conn.execute(_OLD_ROWS)
    return database_url


def test_database_made_before_alembic_upgrades_in_place(
    old_database: str, broker_url: str, key_prefix: str
) -> None:
    with ResultStore.open(old_database) as store:
        assert store.schema_version() == 1  # read from the old version table

    upgraded = run_cli(service_env(broker_url, key_prefix), "db", "upgrade", "--url", old_database)

    assert upgraded.returncode == 0, upgraded.stderr
    assert f"schema version {SCHEMA_VERSION}" in upgraded.stdout
    assert PG_FAKE_PASSWORD not in upgraded.stdout + upgraded.stderr
    with ResultStore.open(old_database) as store:
        store.migrate()  # a worker starting on it afterwards changes nothing
        assert store.schema_version() == SCHEMA_VERSION
        assert store.count() == 2
        old = store.get("old-1")
        assert old is not None
        assert (old.job_key, old.status, old.attempts, old.worker) == (
            "generate:old-1",
            JobStatus.SUCCESS,
            2,
            "worker-old",
        )
        assert old.result == {"text": "Grüße 🥑", "n": [1, 2.5]}
        assert (old.model, old.prompt_tokens, old.completion_tokens) == ("llama3.2:1b", 12, 34)
        assert (old.total_duration_ms, old.eval_duration_ms) == (1500.5, 900.25)
        assert old.created_at == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
        failed = store.get_by_key("summarize:share-1")
        assert failed is not None
        assert (failed.status, failed.result, failed.error) == (
            JobStatus.FAILURE,
            None,
            "OllamaRejected: 400",
        )

        writes: list[tuple[str, str | None, dict[str, Any]]] = [
            ("old-1", None, {"status": JobStatus.STARTED}),  # a late copy: SUCCESS is final
            ("old-2", "share-1", {"status": JobStatus.STARTED}),  # run again: one more attempt
            ("new-1", None, {"status": JobStatus.SUCCESS, "result": {"text": "new"}}),
        ]
        for job_id, share_id, fields in writes:
            kind = JobKind.SUMMARIZE if share_id else JobKind.GENERATE
            key = job_key(kind, job_id, share_id)
            store.record(job_key=key, job_id=job_id, task_type=kind, share_id=share_id, **fields)
        assert store.get("old-1") == old
        rerun = store.get("old-2")
        assert rerun is not None
        assert (rerun.status, rerun.attempts, rerun.created_at) == (
            JobStatus.STARTED,
            2,
            failed.created_at,
        )
        assert [r.job_id for r in store.recent()] == ["new-1", "old-2", "old-1"]
        assert store.recent(status=JobStatus.FAILURE) == []

    with _raw(old_database) as conn:
        # Kept, so a worker of the old release still finds its schema current.
        assert conn.execute("SELECT version FROM ml_results_schema").fetchall() == [(1,)]
        if _dialect(old_database) == "sqlite":  # old and new rows sort together in time
            times = conn.execute("SELECT created_at, updated_at FROM ml_results").fetchall()
            assert all(_ISO.match(t) for row in times for t in row), times


def test_readers_on_an_empty_database_create_no_table(database_url: str) -> None:
    with ResultStore.open(database_url) as store:
        assert store.schema_version() == 0
        for read in (
            lambda: store.get("job-1"),
            lambda: store.get_by_key("generate:job-1"),
            lambda: store.recent(),
            lambda: store.count(),
        ):
            with pytest.raises(StoreError, match=r"no schema yet: run `avocado db upgrade`"):
                read()
    assert _tables(database_url) == set()


def test_db_upgrade_creates_the_schema_of_the_settings_database(
    database_url: str, broker_url: str, key_prefix: str
) -> None:
    env = service_env(broker_url, key_prefix, AVOCADO_DATABASE_URL=database_url)

    made = run_cli(env, "db", "upgrade")

    assert made.returncode == 0, made.stderr
    assert f"ml_results at schema version {SCHEMA_VERSION}" in made.stdout
    assert PG_FAKE_PASSWORD not in made.stdout + made.stderr
    assert _tables(database_url) == {"ml_results", "alembic_version"}
    with ResultStore.open(database_url) as store:
        assert store.count() == 0


def test_a_database_newer_than_this_code_is_not_touched(database_url: str) -> None:
    with ResultStore.open(database_url) as store:
        store.migrate()
    with _raw(database_url) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")

    with ResultStore.open(database_url) as store:
        assert store.schema_version() == 99
        with pytest.raises(StoreError, match=r"cannot upgrade the schema: .*'0099'"):
            store.migrate()
        assert store.count() == 0  # its readers read on
        assert store.schema_version() == 99


def test_schema_version_is_the_newest_revision() -> None:
    scripts = ScriptDirectory(str(Path(avocado_shared.__file__).parent / "migrations"))
    assert scripts.get_heads() == [f"{SCHEMA_VERSION:04d}"]
