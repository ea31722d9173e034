"""The ``ml_results`` store on a real SQLite file and a real PostgreSQL database, same tests."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from pydantic import SecretStr

from avocado_shared.contracts import GenerateResult, JobKind, Usage, parse_result
from avocado_shared.settings import Settings
from avocado_shared.store import (
    SCHEMA_VERSION,
    JobStatus,
    ResultStore,
    StoreError,
    StoreUnavailable,
    job_key,
)

StoreFactory = Callable[[], ResultStore]


@pytest.fixture
def make_store(database_url: str) -> Iterator[StoreFactory]:
    """Open stores on the test's database (one connection each); all closed at teardown."""
    made: list[ResultStore] = []

    def make() -> ResultStore:
        store = ResultStore.open(database_url)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> ResultStore:
    """A migrated store."""
    made = make_store()
    made.migrate()
    return made


def _record(store: ResultStore, job_id: str, status: JobStatus, **fields: Any) -> str:
    key = job_key(JobKind.GENERATE, job_id)
    store.record(
        job_key=key,
        job_id=job_id,
        task_type=JobKind.GENERATE,
        share_id=None,
        status=status,
        worker="worker-1",
        **fields,
    )
    return key


def _started(store: ResultStore, job_id: str) -> str:
    return _record(store, job_id, JobStatus.STARTED)


def _success(store: ResultStore, job_id: str, text: str = "hello") -> str:
    return _record(
        store,
        job_id,
        JobStatus.SUCCESS,
        result={"text": text},
        usage=Usage(
            model="llama3.2:1b",
            prompt_tokens=12,
            completion_tokens=34,
            total_duration_ms=1500.5,
            eval_duration_ms=900.25,
        ),
    )


def test_job_key_names_the_identity() -> None:
    assert job_key(JobKind.SUMMARIZE, "job-1", "share-9") == "summarize:share-9"
    assert job_key("generate", "job-1", "share-9") == "generate:job-1"
    assert job_key(JobKind.SUMMARIZE, "job-1", None) == "summarize:job-1"


def test_migrate_twice_records_the_version(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.schema_version() == 0
    store.migrate()
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION >= 1
    assert store.count() == 0


def test_migrate_from_many_processes_at_once(make_store: StoreFactory) -> None:
    stores = [make_store() for _ in range(4)]
    start = threading.Barrier(len(stores))

    def migrate(store: ResultStore) -> int:
        start.wait()
        store.migrate()
        return store.schema_version()

    with ThreadPoolExecutor(len(stores)) as pool:
        versions = list(pool.map(migrate, stores))
    assert versions == [SCHEMA_VERSION] * len(stores)
    _success(stores[0], "job-1")
    assert stores[-1].count() == 1


def test_redelivered_job_updates_its_one_row(store: ResultStore) -> None:
    key = _started(store, "job-1")
    first = store.get_by_key(key)
    assert first is not None
    assert (first.status, first.attempts, first.result) == (JobStatus.STARTED, 1, None)
    assert first.created_at == first.updated_at
    assert first.created_at.tzinfo is not None
    assert first.created_at.utcoffset() == timedelta(0)

    _started(store, "job-1")  # redelivered after its worker died
    _success(store, "job-1", text="second")
    second = store.get_by_key(key)
    assert second is not None
    assert store.count() == 1
    assert (second.status, second.attempts) == (JobStatus.SUCCESS, 2)
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    assert second.result == {"text": "second"}
    assert (second.model, second.prompt_tokens, second.completion_tokens) == (
        "llama3.2:1b",
        12,
        34,
    )
    assert (second.total_duration_ms, second.eval_duration_ms) == (1500.5, 900.25)
    assert second.worker == "worker-1"


def test_failure_row_carries_the_reason(store: ResultStore) -> None:
    key = job_key(JobKind.GENERATE, "job-f")

    def write(status: JobStatus, error: str) -> None:
        store.record(
            job_key=key,
            job_id="job-f",
            task_type="generate",
            share_id=None,
            status=status,
            error=error,
        )

    write(JobStatus.STARTED, "")
    write(JobStatus.RETRY, "503 server busy")
    write(JobStatus.STARTED, "")
    reason = "unknown model 'nope:1b' and pulls are not allowed"
    write(JobStatus.FAILURE, reason)

    row = store.get("job-f")
    assert row is not None
    assert row.status is JobStatus.FAILURE
    assert row.error == reason
    assert row.result is None
    assert row.attempts == 2
    assert [r.job_key for r in store.recent(status=JobStatus.FAILURE)] == [key]
    assert store.recent(status=JobStatus.SUCCESS) == []


def test_a_success_is_final_for_its_job(store: ResultStore) -> None:
    """A copy turned away while the job ran writes its RETRY after the job's SUCCESS (seen
    when a broker node died): the row stays SUCCESS. A new job on the same key still takes
    the row over."""
    key = job_key(JobKind.SUMMARIZE, "job-1", "share-final")

    def write(job_id: str, status: JobStatus, **fields: Any) -> None:
        store.record(
            job_key=key,
            job_id=job_id,
            task_type=JobKind.SUMMARIZE,
            share_id="share-final",
            status=status,
            **fields,
        )

    write("job-1", JobStatus.STARTED)
    write("job-1", JobStatus.SUCCESS, result={"summary": "done"})
    write("job-1", JobStatus.RETRY, error="TransientError: job-1 is running elsewhere")
    write("job-1", JobStatus.STARTED)
    kept = store.get("job-1")
    write("job-2", JobStatus.STARTED)
    taken = store.get_by_key(key)

    assert kept is not None
    assert (kept.status, kept.result, kept.error, kept.attempts) == (
        JobStatus.SUCCESS,
        {"summary": "done"},
        None,
        1,
    )
    assert taken is not None
    assert (taken.job_id, taken.status, taken.attempts) == ("job-2", JobStatus.STARTED, 1)


def test_summary_rerun_takes_over_the_share_row(store: ResultStore) -> None:
    key = job_key(JobKind.SUMMARIZE, "job-1", "share-9")

    def summarize(job_id: str, summary: str) -> None:
        store.record(
            job_key=key,
            job_id=job_id,
            task_type=JobKind.SUMMARIZE,
            share_id="share-9",
            status=JobStatus.SUCCESS,
            result={"summary": summary},
        )

    summarize("job-1", "old")
    summarize("job-1", "old again")
    before = store.get_by_key(key)
    assert before is not None
    assert (before.attempts, before.result) == (1, {"summary": "old again"})

    summarize("job-2", "new")
    after = store.get_by_key(key)
    assert after is not None
    assert store.count() == 1
    assert (after.job_id, after.attempts, after.result) == ("job-2", 1, {"summary": "new"})
    assert (after.task_type, after.share_id) == ("summarize", "share-9")
    assert after.created_at == before.created_at
    assert store.get("job-1") is None
    assert store.get("job-2") == after


def test_reads(store: ResultStore) -> None:
    for job_id in ["a", "b", "c"]:
        _success(store, job_id)
    store.record(
        job_key="generate:d",
        job_id="d",
        task_type="generate",
        share_id=None,
        status=JobStatus.FAILURE,
        error="bad request",
    )
    _success(store, "a", text="again")  # now the newest

    assert store.count() == 4
    assert [r.job_id for r in store.recent()] == ["a", "d", "c", "b"]
    assert [r.job_id for r in store.recent(limit=2)] == ["a", "d"]
    assert [r.job_id for r in store.recent(status=JobStatus.SUCCESS)] == ["a", "c", "b"]
    row = store.get("b")
    assert row is not None
    assert row == store.get_by_key("generate:b")
    assert (row.job_key, row.status, row.result) == (
        "generate:b",
        JobStatus.SUCCESS,
        {"text": "hello"},
    )
    assert store.get("missing") is None
    assert store.get_by_key("generate:missing") is None
    # A batch's window of jobs, read in one query: those with a row.
    found = store.get_many(["b", "missing", "d"])
    assert sorted(r.job_id for r in found) == ["b", "d"]
    assert row in found
    assert store.get_many([]) == []


def test_concurrent_writers_make_exactly_one_row_per_key(make_store: StoreFactory) -> None:
    make_store().migrate()
    writers, writes, keys = 4, 25, 10
    start = threading.Barrier(writers)

    def write(store: ResultStore) -> None:
        start.wait()
        for n in range(writes):
            _started(store, f"job-{n % keys}")

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, [make_store() for _ in range(writers)]))

    reader = make_store()
    assert reader.count() == keys
    attempts = {r.job_id: r.attempts for r in reader.recent(limit=100)}
    expected = {f"job-{k}": writers * len(range(k, writes, keys)) for k in range(keys)}
    assert attempts == expected  # every start counted once: 12 on job-0..4, 8 on job-5..9
    assert sum(attempts.values()) == writers * writes


def _sessions(database_url: str) -> set[int]:
    """The server pids of the store's PostgreSQL sessions on the database; none on SQLite."""
    if database_url.startswith("sqlite"):
        return set()
    with psycopg.connect(database_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'avocado-results'"
        ).fetchall()
    return {pid for (pid,) in rows}


def test_forked_processes_get_their_own_connection(store: ResultStore, database_url: str) -> None:
    _started(store, "parent")  # the parent's connection is open when the children fork
    parent_sessions = _sessions(database_url)
    fork = multiprocessing.get_context("fork")

    def child(n: int) -> None:
        for i in range(25):
            _started(store, f"job-{i % 5}")

    children = [fork.Process(target=child, args=(n,)) for n in range(4)]
    for process in children:
        process.start()
    for process in children:
        process.join(timeout=60)
        if process.is_alive():  # hung on a shared connection: do not outlive the test
            process.kill()
            process.join()
    assert [p.exitcode for p in children] == [0] * len(children)

    # The parent's session survived the children's exit (none closed it: a dropped one would
    # be replaced unseen, by the pool's pre-ping) and still writes.
    assert parent_sessions <= _sessions(database_url)
    _started(store, "parent")
    assert store.count() == 6
    assert sorted(r.attempts for r in store.recent(limit=10)) == [2] + [20] * 5


def test_json_result_round_trips(store: ResultStore) -> None:
    result = {
        "text": 'Avocat épicé 🥑 — 辣鳄梨, «quotes» and "escapes" \\ \n newline',
        "nested": {"list": [1, 2.5, True, None, "ü"], "empty": {}},
        "big": 2**53,
    }
    store.record(
        job_key="generate:job-u",
        job_id="job-u",
        task_type="generate",
        share_id=None,
        status=JobStatus.SUCCESS,
        result=result,
    )
    row = store.get("job-u")
    assert row is not None
    assert row.result == result

    model = GenerateResult(job_id="job-m", model="llama3.2:1b", worker="w", text="Grüße 🌶️")
    store.record(
        job_key="generate:job-m",
        job_id="job-m",
        task_type=JobKind.GENERATE,
        share_id=None,
        status=JobStatus.SUCCESS,
        result=model.model_dump(mode="json"),
    )
    stored = store.get("job-m")
    assert stored is not None
    assert stored.result is not None
    assert parse_result(stored.result) == model


def test_result_that_is_not_json_is_refused_before_writing(store: ResultStore) -> None:
    with pytest.raises(StoreError, match="not plain JSON"):
        store.record(
            job_key="generate:x",
            job_id="x",
            task_type="generate",
            share_id=None,
            status=JobStatus.SUCCESS,
            result={"when": object()},
        )
    assert store.count() == 0


def test_from_settings(database_url: str, tmp_path: Path) -> None:
    with ResultStore.from_settings(Settings(database_url=SecretStr(database_url))) as by_url:
        by_url.migrate()
        assert by_url.schema_version() == SCHEMA_VERSION
        assert by_url.dialect == ("sqlite" if database_url.startswith("sqlite") else "postgresql")

    path = tmp_path / "default.sqlite3"
    with ResultStore.from_settings(Settings(database_url=None, sqlite_path=str(path))) as default:
        assert default.dialect == "sqlite"
        default.migrate()
    assert path.is_file()


def test_repr_hides_the_password(store: ResultStore, database_url: str) -> None:
    text = repr(store)
    password = urlsplit(database_url).password
    if password:
        assert password not in text
        assert ":***@" in text
    else:
        assert database_url in text


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound but not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://avocado:{secret}@127.0.0.1:{port}/results",
        "postgres://avocado@127.0.0.1:{port}/results?password={secret}&sslmode=disable",
    ],
)
def test_unreachable_postgres_error_hides_the_password(closed_port: int, template: str) -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    store = ResultStore.open(template.format(secret=secret, port=closed_port))
    assert secret not in repr(store)
    with pytest.raises(StoreUnavailable) as raised:
        store.migrate()
    shown = "".join(traceback.format_exception(raised.value))
    assert secret not in shown
    assert f"127.0.0.1:{closed_port}" in str(raised.value)
    store.close()


def test_unreachable_sqlite_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "results.sqlite3"
    with (
        ResultStore.open(f"sqlite:///{missing}") as store,
        pytest.raises(StoreUnavailable, match="no-such-dir"),
    ):
        store.migrate()


def test_postgres_connection_dropped_by_the_server_is_remade(pg_database: str) -> None:
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS ml_results, ml_results_schema, alembic_version")
    with ResultStore.open(pg_database) as store:
        store.migrate()
        _success(store, "before")
        with psycopg.connect(pg_database, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'avocado-results'"
            ).fetchall()
        assert killed == [(True,)]
        _success(store, "after")
        assert store.count() == 2
