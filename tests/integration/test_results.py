"""Durable results: what workers write to ``ml_results``, read back by ``avocado result``.

The same test runs on a SQLite file and on a PostgreSQL database.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from avocado_shared import JobFailed, JobStatus, Producer, ResultRow, ResultStore
from avocado_shared.store import SCHEMA_VERSION
from avocado_shared.topology import GENERATE_TASK
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import PG_ADMIN_URL, PG_FAKE_PASSWORD, WorkerFactory
from tests.services import run_cli, service_env, wait_for

WAIT = 60


def _ended(store: ResultStore, job_id: str) -> ResultRow | None:
    row = store.get(job_id)
    return row if row is not None and row.status is JobStatus.FAILURE else None


def test_results_are_stored_and_read_back(
    producer: Producer,
    fresh_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    database_url: str,
    broker_url: str,
    key_prefix: str,
) -> None:
    worker = worker_factory(fresh_sim.url, AVOCADO_DATABASE_URL=database_url)
    store = ResultStore.open(database_url)
    assert store.schema_version() == SCHEMA_VERSION  # migrated when the worker started
    cli = service_env(broker_url, key_prefix, AVOCADO_DATABASE_URL=database_url)
    share_id = f"results-{uuid.uuid4().hex[:8]}"

    generated = producer.generate("Store me.", options={"num_predict": 12}).get(timeout=WAIT)
    first = producer.summarize(share_id, "A first version of the text.").get(timeout=WAIT)
    fresh_sim.config.fail_status, fresh_sim.config.fail_first = 503, 2
    second = producer.summarize(share_id, "A second version of the text.").get(timeout=WAIT)
    fresh_sim.config.fail_status, fresh_sim.config.fail_first = 400, 1
    rejected = producer.generate("Refused.")
    invalid = producer.app.send_task(GENERATE_TASK, kwargs={"request": {"prompt": 7}})
    for failing in (rejected, producer.handle(invalid.id)):
        try:
            failing.get(timeout=WAIT)
        except JobFailed:
            continue
        raise AssertionError(f"job {failing.id} should have failed")

    row = store.get(generated.job_id)
    assert row is not None
    assert (row.status, row.task_type, row.share_id, row.attempts) == (
        JobStatus.SUCCESS,
        "generate",
        None,
        1,
    )
    assert row.result == generated.model_dump(mode="json")
    assert (row.model, row.prompt_tokens, row.completion_tokens) == (
        generated.model,
        generated.prompt_tokens,
        generated.completion_tokens,
    )
    assert row.completion_tokens == 12
    assert row.total_duration_ms == generated.total_duration_ms > 0
    assert row.eval_duration_ms == generated.eval_duration_ms > 0
    assert row.worker == worker.name
    assert row.created_at <= row.updated_at

    # One row per shared item: the second summary took it over, after two busy answers.
    summary = store.get_by_key(f"summarize:{share_id}")
    assert summary is not None
    assert (summary.job_id, summary.status, summary.attempts) == (
        second.job_id,
        JobStatus.SUCCESS,
        3,
    )
    assert summary.result is not None
    assert summary.result["summary"] == second.summary
    assert store.get(first.job_id) is None

    # Celery publishes a failure before the task's on_failure hook writes its row.
    failed = wait_for(lambda: _ended(store, rejected.id), timeout=WAIT, what="the failure row")
    assert failed.status is JobStatus.FAILURE
    assert failed.error is not None
    assert failed.error.startswith("OllamaRejected: ollama refused the request: ")
    assert failed.attempts == 1
    bad = wait_for(lambda: _ended(store, invalid.id), timeout=WAIT, what="the invalid job's row")
    assert (bad.status, bad.attempts) == (JobStatus.FAILURE, 1)
    assert bad.error is not None
    assert bad.error.startswith("InvalidPayload: ")
    assert "prompt" in bad.error
    store.close()

    # `avocado result` reads the table: it answers after Redis forgot the job.
    producer.app.backend.forget(generated.job_id)
    shown = run_cli(cli, "result", generated.job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == generated.model_dump(mode="json")
    by_share = run_cli(cli, "result", "--share-id", share_id, "--json")
    assert by_share.returncode == 0, by_share.stderr
    assert json.loads(by_share.stdout)["summary"] == second.summary
    refused = run_cli(cli, "result", rejected.id)
    assert refused.returncode == JobFailed.exit_code == 3
    assert (
        f"job {rejected.id} failed: OllamaRejected: ollama refused the request: " in refused.stderr
    )
    assert PG_FAKE_PASSWORD not in worker.log_text() + refused.stderr + shown.stderr


def test_a_failed_result_write_is_retried_without_running_the_model_again(
    producer: Producer, worker_factory: WorkerFactory, pg_database: str
) -> None:
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS ml_results, ml_results_schema, alembic_version")
    database = urlsplit(pg_database).path.lstrip("/")
    name = sql.Identifier(database)
    with OllamaSimulator(SimConfig(latency_ms=1500)) as sim:
        worker = worker_factory(sim.url, concurrency=1, AVOCADO_DATABASE_URL=pg_database)
        handle = producer.generate("Store me, eventually.")
        assert sim.wait_in_flight(1, timeout=WAIT)
        # While the model answers, the database stops taking connections and drops the
        # worker's: its result cannot be written.
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
            try:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database,),
                )
                wait_for(
                    lambda: "result not stored" in worker.log_text(),
                    timeout=WAIT,
                    what="the result write to fail",
                )
            finally:
                admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))

        result = handle.get(timeout=WAIT)

        assert result.text
        assert sim.generation_calls == 1
        with ResultStore.open(pg_database) as store:
            row = store.get(handle.id)
        assert row is not None
        assert row.status is JobStatus.SUCCESS
        assert row.result is not None
        assert row.result["text"] == result.text
