"""Flow control and duplicate work (issue 13), on a private RabbitMQ 4 node: alarms block
publishers, connections close under a worker, the broker refuses a message."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from avocado_shared import (
    InvalidRequest,
    JobStatus,
    Producer,
    PublishError,
    PublishOutcomeUnknown,
    ResultStore,
    Settings,
)
from avocado_shared.routing import Lane
from avocado_shared.topology import declare_topology
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory, worker_processes
from tests.proxy import OneWayProxy
from tests.rabbit import ALARMS, RabbitNode, alarm_raised, lane_queue, new_vhost, queue_depth
from tests.services import REDIS_URL, RedisServer, free_port, run_cli, service_env, wait_for

WAIT = 90
# Where the default model's jobs from the Python API wait, summaries and generations alike.
BATCH = lane_queue(Lane.BATCH)
NODE_MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """A RabbitMQ 4 node of this module, refusing messages over 1 MiB."""
    conf = f"max_message_size = {NODE_MAX_MESSAGE}\n"
    with RabbitNode.private(4, free_port()).running(conf) as node:
        yield node


@pytest.fixture
def url(node: RabbitNode) -> str:
    """A vhost of this test on the module's node (which goes with the node)."""
    return new_vhost(node.broker())


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _settings(url: str, key_prefix: str, **extra: object) -> Settings:
    return Settings(broker_url=url, redis_url=REDIS_URL, key_prefix=key_prefix, **extra)


def _summary_calls(sim: OllamaSimulator, text: str) -> int:
    """Generation calls whose prompt carries ``text``."""
    return sum(text in str(r.body) for r in sim.requests.to("/api/generate"))


@pytest.mark.parametrize("alarm", sorted(ALARMS))
def test_an_alarm_fails_publishers_fast_and_each_job_runs_once(
    node: RabbitNode, url: str, key_prefix: str, tmp_path: Path, alarm: str
) -> None:
    settings = _settings(url, key_prefix, publish_timeout_s=30)
    shares = [_uid(alarm) for _ in range(3)]
    texts = {share: f"Item {share} to summarize." for share in shares}
    with (
        OllamaSimulator(SimConfig()) as sim,
        Producer(settings) as producer,
        worker_processes(url, key_prefix, producer, tmp_path) as workers,
    ):
        with producer.app.connection_for_write() as connection:
            declare_topology(connection, settings)
        with alarm_raised(node, alarm) as reason:
            failures: list[tuple[float, PublishError]] = []
            for share in [*shares, shares[0]]:  # the first one twice
                started = time.monotonic()
                with pytest.raises(PublishError) as caught:
                    producer.summarize(share, texts[share])
                failures.append((time.monotonic() - started, caught.value))
            cli = run_cli(service_env(url, key_prefix), "generate", "Blocked?")
            print(f"{alarm} alarm: seconds until PublishError {[round(t, 3) for t, _ in failures]}")
            print(f"{alarm} alarm: the CLI said {cli.stderr.strip()!r}")

        first, *refused = [error for _, error in failures]
        # The first publish met connection.blocked: sent, not confirmed, not sent again;
        # it ended on the broker's notice, not after the 30 s publish timeout.
        assert isinstance(first, PublishOutcomeUnknown)
        assert f"the broker blocked publishing ({reason})" in str(first)
        for error in refused:  # the gate knew: nothing was sent
            assert type(error) is PublishError
            assert f"not published: the broker blocks publishing ({reason})" in str(error)
        # Not published (the gate knew), or sent and not confirmed (its own first publish).
        assert cli.returncode in (PublishError.exit_code, PublishOutcomeUnknown.exit_code)
        assert len(cli.stderr.strip().splitlines()) == 1
        assert reason in cli.stderr
        assert "Traceback" not in cli.stderr

        # The blocked job was sent once: RabbitMQ queues it when it reads that connection
        # again, unless it found the connection closed first. Never more than that copy.
        # One lane queue holds both: the summary, and the CLI's job (the same for it).
        assert queue_depth(producer, BATCH) <= 2
        handles = [producer.summarize(share, texts[share]) for share in shares]
        assert handles[0].id == first.job_id  # published again under its own id
        workers(sim.url)

        results = [h.get(timeout=WAIT) for h in handles]

        assert [r.share_id for r in results] == shares
        wait_for(lambda: queue_depth(producer, BATCH) == 0, timeout=WAIT, what="a drain")
        assert {share: _summary_calls(sim, texts[share]) for share in shares} == dict.fromkeys(
            shares, 1
        )
        assert sum("Blocked?" in str(r.body) for r in sim.requests.to("/api/generate")) <= 1


def test_a_confirm_that_never_comes_is_an_unknown_outcome_and_no_second_copy(
    node: RabbitNode, url: str, key_prefix: str
) -> None:
    with OneWayProxy(("127.0.0.1", node.port)) as proxy:
        proxied = url.replace(f"127.0.0.1:{node.port}", f"127.0.0.1:{proxy.port}")
        with (
            Producer(_settings(proxied, key_prefix, publish_timeout_s=2)) as producer,
            Producer(_settings(url, key_prefix)) as observer,
        ):
            producer.generate("connected, topology declared")
            wait_for(lambda: queue_depth(observer, BATCH) == 1, timeout=WAIT, what="the first")
            share = _uid("lost-confirm")
            proxy.hold()  # the job reaches RabbitMQ; its confirm does not come back
            started = time.monotonic()
            with pytest.raises(PublishOutcomeUnknown) as caught:
                producer.summarize(share, "Confirm me.")
            print(f"lost confirm: {time.monotonic() - started:.2f}s until {caught.value}")
            proxy.release()

            assert "not confirmed: no confirm within the publish timeout" in str(caught.value)
            assert "not sent again" in str(caught.value)
            wait_for(lambda: queue_depth(observer, BATCH) == 2, timeout=WAIT, what="a copy")
            again = producer.summarize(share, "Confirm me.")  # as docs/reliability.md says to
            assert again.id == caught.value.job_id
            assert queue_depth(observer, BATCH) == 3  # one job id twice; a worker runs it once


def test_a_job_whose_ack_is_lost_with_its_connection_runs_once(
    node: RabbitNode, url: str, key_prefix: str, tmp_path: Path
) -> None:
    database = tmp_path / "results.sqlite3"
    with RedisServer(tmp_path) as results_redis:
        settings = _settings(url, key_prefix, result_backend_url=results_redis.url)
        with (
            OllamaSimulator(SimConfig(latency_ms=500)) as sim,
            Producer(settings) as producer,
            worker_processes(url, key_prefix, producer, tmp_path) as workers,
            ResultStore.open(f"sqlite:///{database}") as store,
        ):
            worker = workers(
                sim.url,
                concurrency=1,
                AVOCADO_RESULT_BACKEND_URL=results_redis.url,
                AVOCADO_SQLITE_PATH=str(database),
            )
            handle = producer.generate("Answer once.", idempotency_key=_uid("ack"))
            assert sim.wait_in_flight(1, timeout=30)
            # The result backend goes away: the worker stores the row, then holds the job
            # unacknowledged while it retries the result; its connection is closed then.
            results_redis.stop()

            def stored() -> bool:
                row = store.get(handle.id)
                return row is not None and row.status is JobStatus.SUCCESS

            wait_for(stored, timeout=WAIT, what="the row, before the ack")
            node.ctl("close_all_connections", "--global", "test: the worker's ack is lost")
            wait_for(
                lambda: "Connection to broker lost" in worker.log_text(),
                timeout=WAIT,
                what="the worker to lose its connection",
            )
            results_redis.start()

            result = handle.get(timeout=WAIT)
            wait_for(
                lambda: "already succeeded" in worker.log_text(),
                timeout=WAIT,
                what="the redelivered job to be acknowledged with its stored result",
            )

            assert result.text
            assert sim.generation_calls == 1
            rows = [r for r in store.recent(limit=10) if r.job_id == handle.id]
            assert len(rows) == 1
            assert rows[0].status is JobStatus.SUCCESS
            assert rows[0].attempts == 1


def test_two_copies_of_one_job_id_run_once(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    # Two copies of one job id in the queue, as a producer in another language may send
    # after a timed-out confirm; a worker with two threads takes both at once. A short lease:
    # the copy turned away comes back when it would have run out (4 s, not 11 s).
    with OllamaSimulator(SimConfig(latency_ms=1500)) as sim:
        worker = worker_factory(sim.url, concurrency=2, AVOCADO_JOB_LEASE_S="3")
        job_id = str(uuid.uuid4())
        task = producer.app.tasks["avocado.generate"]
        request = {"request": {"prompt": "Only once."}}
        for _ in range(2):
            task.apply_async(kwargs=request, task_id=job_id)
        handle = producer.handle(job_id)

        result = handle.get(timeout=WAIT)
        wait_for(
            lambda: f"[{job_id}] already succeeded" in worker.log_text(),
            timeout=WAIT,
            what="the second copy to end on the stored result",
        )

        assert result.text
        assert sim.generation_calls == 1
        assert f"[{job_id}]: job {job_id} is running elsewhere" in worker.log_text()
        row = producer.results.get(job_id)
        assert row is not None
        assert row.status is JobStatus.SUCCESS
        assert row.attempts == 1


def test_an_oversized_summary_is_refused_before_anything_is_locked_or_sent(
    url: str, key_prefix: str
) -> None:
    with Producer(_settings(url, key_prefix)) as producer:
        limit = producer.settings.max_request_bytes
        share = _uid("big")
        producer.generate("declare the topology")
        before = queue_depth(producer, BATCH)

        with pytest.raises(InvalidRequest) as caught:
            producer.summarize(share, "x" * limit)

        print(f"oversized: {caught.value}")
        assert f"over the limit of {limit} bytes (AVOCADO_MAX_REQUEST_BYTES" in str(caught.value)
        assert queue_depth(producer, BATCH) == before
        locks = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        assert not [k for k in locks.scan_iter(f"{key_prefix}lock:*") if share in k]


def test_a_message_the_broker_refuses_is_a_publish_error_with_its_reason(
    url: str, key_prefix: str
) -> None:
    # Our limit set above this node's max_message_size: RabbitMQ refuses the message.
    settings = _settings(url, key_prefix, max_request_bytes=4 * NODE_MAX_MESSAGE)
    with Producer(settings) as producer:
        share = _uid("refused")

        with pytest.raises(PublishError) as caught:
            producer.summarize(share, "x" * (2 * NODE_MAX_MESSAGE))

        print(f"refused: {caught.value}")
        assert not isinstance(caught.value, PublishOutcomeUnknown)
        assert "not published" in str(caught.value)
        assert f"larger than configured max size {NODE_MAX_MESSAGE}" in str(caught.value)
        locks = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        assert not [k for k in locks.scan_iter(f"{key_prefix}lock:*") if share in k]
        # The same producer publishes the next job, and the same share id, on a new channel.
        assert producer.summarize(share, "Small enough.").id
