"""No job lost, none run twice, every failure classified: with real processes killed."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from avocado_shared import JobFailed, JobHandle, JobStatus, Producer, ResultStore, Settings
from avocado_shared.routing import Lane, lane_queue_name
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory, worker_processes
from tests.rabbit import RabbitNode, purge, queue_depth
from tests.services import REDIS_URL, RedisServer, WorkerProcess, wait_for

WAIT = 90


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _locks(key_prefix: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    return list(client.scan_iter(f"{key_prefix}lock:*"))


@pytest.fixture
def slow_sim() -> Iterator[OllamaSimulator]:
    """A simulator of this test only, answering after a delay so jobs are caught in flight."""
    with OllamaSimulator(SimConfig(latency_ms=300)) as server:
        yield server


def test_duplicate_summary_while_running_shares_one_execution(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    worker_factory(slow_sim.url)
    slow_sim.config.latency_ms = 1500
    share_id = _uid("dup")

    first = producer.summarize(share_id, "Quorum queues replicate with Raft.")
    assert slow_sim.wait_in_flight(1, timeout=30)
    second = producer.summarize(share_id, "Quorum queues replicate with Raft.")

    assert second.id == first.id
    assert first.get(timeout=WAIT) == second.get(timeout=WAIT)
    assert slow_sim.generation_calls == 1

    third = producer.summarize(share_id, "Quorum queues replicate with Raft.")

    assert third.id != first.id
    assert third.get(timeout=WAIT).share_id == share_id
    assert slow_sim.generation_calls == 2


def test_generate_with_idempotency_key_is_not_queued_twice(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    worker_factory(slow_sim.url)
    key = _uid("idem")

    handles = [producer.generate("Hello", idempotency_key=key) for _ in range(3)]
    plain = [producer.generate("Hello") for _ in range(2)]

    assert len({h.id for h in handles}) == 1
    assert len({h.id for h in plain}) == 2
    for handle in handles + plain:
        handle.get(timeout=WAIT)
    assert slow_sim.generation_calls == 3


def test_singleton_job_really_retries_after_busy_answers(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory, key_prefix: str
) -> None:
    worker_factory(slow_sim.url)
    slow_sim.config.fail_status = 503
    slow_sim.config.fail_first = 3
    share_id = _uid("retry")

    result = producer.summarize(share_id, "Retry me.").get(timeout=WAIT)

    assert result.share_id == share_id
    assert slow_sim.generation_calls == 4
    assert not [k for k in _locks(key_prefix) if share_id in k]


def test_jobs_survive_ollama_going_away_and_coming_back(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    sim = OllamaSimulator(SimConfig()).start()
    port = sim.port
    worker_factory(sim.url)
    sim.stop()

    handle = producer.summarize(_uid("outage"), "The server was down for a while.")
    wait_for(lambda: handle.state == "RETRY", timeout=WAIT, what="the job to be retried")
    with OllamaSimulator(SimConfig(), port=port) as back:
        result = handle.get(timeout=WAIT)

        assert result.summary
        assert back.generation_calls == 1


def test_bad_request_fails_once_with_a_clear_reason(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory, key_prefix: str
) -> None:
    worker_factory(slow_sim.url)
    slow_sim.config.fail_status = 400
    slow_sim.config.fail_first = 1
    share_id = _uid("bad")

    handle = producer.summarize(share_id, "Bad.")

    with pytest.raises(JobFailed, match="OllamaRejected: ollama refused the request: "):
        handle.get(timeout=WAIT)
    assert slow_sim.generation_calls == 1
    assert not [k for k in _locks(key_prefix) if share_id in k]


def test_a_node_that_may_not_pull_leaves_a_job_of_a_model_it_lacks_queued(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    worker_factory(slow_sim.url, AVOCADO_ALLOW_PULL="false")
    queue = lane_queue_name("mistral:7b", Lane.BATCH)

    handle = producer.generate("Hi", model="mistral:7b")
    # Rounds of the node's model follower (every half second here) see the job waiting.
    asked = len(slow_sim.requests.to("/api/tags"))
    wait_for(
        lambda: len(slow_sim.requests.to("/api/tags")) >= asked + 3,
        timeout=WAIT,
        what="three rounds of the node's model follower",
    )

    assert queue_depth(producer, queue) == 1
    assert handle.state == "PENDING"
    assert not slow_sim.requests.to("/api/pull")
    assert slow_sim.generation_calls == 0
    purge(producer, queue)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_job_past_its_soft_time_limit_fails_and_is_not_redelivered(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory, pool: str
) -> None:
    # Prefork: Celery's soft limit or the Ollama client's deadline, whichever comes first;
    # threads: the deadline alone (Celery enforces no time limit there).
    worker_factory(
        slow_sim.url,
        AVOCADO_GENERATE_SOFT_TIME_LIMIT_S="2",
        AVOCADO_GENERATE_TIME_LIMIT_S="5",
        AVOCADO_WORKER_POOL=pool,
    )
    slow_sim.config.latency_ms = 10_000

    handle = producer.generate("Take your time.")

    with pytest.raises(JobFailed, match=r"JobTimedOut: .*soft time limit of 2s"):
        handle.get(timeout=WAIT)
    slow_sim.config.latency_ms = 0
    producer.generate("Next one.").get(timeout=WAIT)
    assert slow_sim.generation_calls == 2


def _submit_mix(producer: Producer, count: int, tag: str) -> list[JobHandle[object]]:
    handles: list[JobHandle[object]] = []
    for i in range(count):
        if i % 2:
            handles.append(producer.summarize(f"{tag}-{i}", f"Item {i} to summarize."))
        else:
            handles.append(producer.generate(f"Job {i}", idempotency_key=f"{tag}-{i}"))
    return handles


@pytest.mark.both_brokers
def test_sigkilled_worker_loses_no_job(
    producer: Producer,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    key_prefix: str,
    database_url: str,
) -> None:
    slow_sim.config.latency_ms = 150  # 50 jobs on 2 slots: 4 s of answers, some in flight
    # The shortest lease: the jobs it dies holding are redelivered that much later.
    doomed = worker_factory.process(
        slow_sim.url, concurrency=2, AVOCADO_DATABASE_URL=database_url, AVOCADO_JOB_LEASE_S="3"
    )
    tag = _uid("crash")
    handles = _submit_mix(producer, 50, tag)

    wait_for(lambda: sum(h.ready() for h in handles) >= 6, timeout=WAIT, what="some jobs done")
    wait_for(lambda: slow_sim.in_flight >= 1, timeout=30, what="a job in flight")
    doomed.kill()
    done_before = sum(h.ready() for h in handles)
    worker_factory(slow_sim.url, concurrency=2, AVOCADO_DATABASE_URL=database_url)

    results = [h.get(timeout=WAIT) for h in handles]

    assert done_before < 50
    assert len({r.job_id for r in results}) == 50
    assert {r.job_id for r in results} == {h.id for h in handles}
    with ResultStore.open(database_url) as store:
        rows = store.recent(limit=100)
    assert len(rows) == 50
    assert {r.job_id for r in rows} == {h.id for h in handles}
    assert {r.status for r in rows} == {JobStatus.SUCCESS}
    assert max(r.attempts for r in rows) == 2  # the jobs in flight ran again, once
    wait_for(lambda: not [k for k in _locks(key_prefix) if tag in k], what="locks released")


def test_sigterm_finishes_the_running_job_and_leaves_the_rest_queued(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    slow_sim.config.latency_ms = 1000
    first: WorkerProcess = worker_factory.process(slow_sim.url, concurrency=1)
    handles = [producer.generate(f"Graceful {i}") for i in range(4)]
    assert slow_sim.wait_in_flight(1, timeout=30)

    code = first.stop(signal.SIGTERM, timeout=60)

    assert code == 0
    assert handles[0].ready()
    assert not all(h.ready() for h in handles)
    worker_factory(slow_sim.url, concurrency=1)
    assert all(h.get(timeout=WAIT).text for h in handles)


@pytest.mark.both_brokers
def test_rabbitmq_restart_loses_no_job_and_workers_resume(
    private_node: RabbitNode, key_prefix: str, slow_sim: OllamaSimulator, tmp_path: Path
) -> None:
    slow_sim.config.latency_ms = 200
    database = tmp_path / "results.sqlite3"
    url = private_node.broker().url("")
    settings = Settings(broker_url=url, redis_url=REDIS_URL, key_prefix=key_prefix)
    with (
        Producer(settings) as producer,
        worker_processes(url, key_prefix, producer, tmp_path) as worker_factory,
    ):
        worker = worker_factory(slow_sim.url, concurrency=2, AVOCADO_SQLITE_PATH=str(database))
        tag = _uid("restart")
        handles = _submit_mix(producer, 20, tag)
        wait_for(lambda: sum(h.ready() for h in handles) >= 4, timeout=WAIT, what="some jobs done")

        private_node.ctl("stop_app")  # every connection closed, the node's VM stays up
        wait_for(
            lambda: "Connection to broker lost" in worker.log_text(),
            timeout=WAIT,
            what="the worker to notice the broker went away",
        )
        private_node.ctl("start_app")
        handles += _submit_mix(producer, 6, f"{tag}-after")

        results = [h.get(timeout=WAIT) for h in handles]

        assert {r.job_id for r in results} == {h.id for h in handles}
        with ResultStore.open(f"sqlite:///{database}") as store:
            rows = store.recent(limit=100)
        assert sorted(r.job_id for r in rows) == sorted(h.id for h in handles)
        assert {r.status for r in rows} == {JobStatus.SUCCESS}
        assert worker.alive()  # the same process, reconnected on its own
        assert "Connected to amqp://" in worker.log_text().split("Connection to broker lost")[-1]


def test_redis_restart_loses_no_job_and_runs_none_twice(
    broker_url: str,
    key_prefix: str,
    slow_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    tmp_path: Path,
) -> None:
    database = tmp_path / "results.sqlite3"
    tag = _uid("redis")
    with RedisServer(tmp_path) as private_redis:
        settings = Settings(
            broker_url=broker_url, redis_url=private_redis.url, key_prefix=key_prefix
        )
        with Producer(settings) as producer:
            worker = worker_factory(
                slow_sim.url,
                AVOCADO_REDIS_URL=private_redis.url,
                AVOCADO_SQLITE_PATH=str(database),
            )
            slow_sim.config.latency_ms = 1000
            handles = [producer.summarize(f"{tag}-{i}", f"Item {i}.") for i in range(10)]
            wait_for(lambda: handles[0].ready(), timeout=WAIT, what="a first job done")
            private_redis.down_until(
                lambda: "Failed operation" in worker.log_text(),
                "the worker to hold a result while Redis is down",
                timeout=WAIT,
            )
            results = [h.get(timeout=WAIT) for h in handles]

            assert {r.share_id for r in results} == {f"{tag}-{i}" for i in range(10)}
            assert slow_sim.generation_calls == 10  # none ran twice
            assert worker.alive()
            client = redis.Redis.from_url(private_redis.url, decode_responses=True)
            assert not list(client.scan_iter(f"{key_prefix}lock:*"))
    with ResultStore.open(f"sqlite:///{database}") as store:
        rows = store.recent(limit=100)
    assert sorted(r.share_id or "" for r in rows) == sorted(r.share_id for r in results)
    assert {r.status for r in rows} == {JobStatus.SUCCESS}


def test_a_warm_shutdown_lets_the_running_job_finish_with_its_clients_open(
    producer: Producer, slow_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    # Celery stops a worker's bootsteps before its pool: resources closed then would cut
    # the running job's HTTP stream and its result write (it would go to RETRY).
    worker = worker_factory(slow_sim.url, concurrency=1)
    slow_sim.config.latency_ms = 2000
    handle = producer.generate("Finish me.")
    assert slow_sim.wait_in_flight(1, timeout=30)

    assert worker.stop() == 0

    assert handle.get(timeout=WAIT).text
    assert slow_sim.generation_calls == 1
    row = producer.results.get(handle.id)
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.attempts == 1
