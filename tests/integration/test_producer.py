"""The producer side: refusal of bad requests before publishing, the topology, the CLI."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from avocado_shared import InvalidRequest, Producer, PublishError, Settings
from avocado_shared.routing import Lane
from avocado_shared.topology import (
    DEAD_LETTER_QUEUE,
    GENERATE_QUEUE,
    SUMMARIZE_QUEUE,
    declare_lane_queues,
    declare_topology,
)
from avocado_sim import OllamaSimulator
from tests.rabbit import DEFAULT_MODEL, Broker, lane_queue
from tests.services import REDIS_URL, WorkerProcess, run_cli, service_env


def _depth(producer: Producer, queue: str) -> int:
    with producer.app.connection_for_write() as connection:
        channel = connection.default_channel
        _, messages, _ = channel.queue_declare(queue, passive=True)
        return int(messages)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.generate(None), "exactly one of prompt or messages"),
        (lambda p: p.generate("hi", messages=[{"role": "user", "content": "x"}]), "exactly one"),
        (lambda p: p.generate("   "), "prompt"),
        (lambda p: p.generate(messages=[]), "messages must not be empty"),
        (lambda p: p.generate(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
        (lambda p: p.generate("hi", options={"temperature": {"a": 1}}), "options.temperature"),
        (lambda p: p.generate("hi", format="xml"), "format"),
        (lambda p: p.generate("hi", model="two words"), "model"),
        (lambda p: p.summarize("", "text"), "share_id"),
        (lambda p: p.summarize("s1", "   "), "content.text"),
        (lambda p: p.summarize("s1", {"title": "no text"}), "content.text"),
        (lambda p: p.summarize("s1", "text", options={"max_words": 5}), "options.max_words"),
        (lambda p: p.summarize("s1", "text", options={"colour": "red"}), "options.colour"),
    ],
)
def test_invalid_requests_are_refused_before_publishing(
    producer: Producer, call: Any, message: str
) -> None:
    with producer.app.connection_for_write() as connection:
        declare_topology(connection, producer.settings)
        declare_lane_queues(connection, DEFAULT_MODEL, producer.settings)
    queues = (GENERATE_QUEUE, SUMMARIZE_QUEUE, *(lane_queue(lane) for lane in Lane))
    before = [_depth(producer, queue) for queue in queues]

    with pytest.raises(InvalidRequest, match=r"invalid (generate|summarize) request") as caught:
        call(producer)

    assert message in str(caught.value)
    assert [_depth(producer, queue) for queue in queues] == before


@pytest.mark.both_brokers
def test_queues_are_quorum_with_delivery_limit_and_dead_lettering(
    producer: Producer, broker_url: str, rabbit: Broker
) -> None:
    lanes = [lane_queue(lane) for lane in Lane]
    with producer.app.connection_for_write() as connection:
        declare_topology(connection, producer.settings)
        declare_lane_queues(connection, DEFAULT_MODEL, producer.settings)
    vhost = broker_url.rsplit("/", 1)[1]

    queues = rabbit.queues(vhost)

    for name in (GENERATE_QUEUE, SUMMARIZE_QUEUE, "infra.announce", *lanes):
        args = queues[name]["arguments"]
        assert queues[name]["type"] == "quorum"
        assert args["x-delivery-limit"] == producer.settings.delivery_limit
        assert args["x-dead-letter-exchange"] == "ml.dlx"
        assert (args["x-dead-letter-strategy"], args["x-overflow"]) == (
            "at-least-once",
            "reject-publish",
        )
    assert queues[DEAD_LETTER_QUEUE]["type"] == "quorum"
    # No delivery limit on the dead letters: RabbitMQ 4's -1, RabbitMQ 3's none (its -1 drops).
    dead = queues[DEAD_LETTER_QUEUE]["arguments"]
    assert dead.get("x-delivery-limit") == (-1 if rabbit.major >= 4 else None)


def test_cli_generate_and_summarize_wait_for_results(
    broker_url: str, key_prefix: str, fresh_sim: OllamaSimulator, worker: WorkerProcess
) -> None:
    env = service_env(broker_url, key_prefix)

    gen = run_cli(env, "generate", "Why is the sky blue?", "--wait")
    summ = run_cli(env, "summarize", "--share-id", "cli-1", "--text", "A long day.", "--wait")

    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip()
    assert f"on {worker.name}" in gen.stderr
    assert summ.returncode == 0, summ.stderr
    assert summ.stdout.strip()
    assert "summarize" in summ.stderr


def test_cli_submit_then_read_result_as_json(
    broker_url: str, key_prefix: str, fresh_sim: OllamaSimulator, worker: WorkerProcess
) -> None:
    env = service_env(broker_url, key_prefix)

    submitted = run_cli(env, "generate", "Hello", "-o", "num_predict=5")
    job_id = submitted.stdout.strip()
    shown = run_cli(env, "result", job_id, "--wait", "--json")

    assert submitted.returncode == 0, submitted.stderr
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["job_id"] == job_id
    assert data["completion_tokens"] == 5
    assert data["kind"] == "generate"


def test_cli_refuses_invalid_request_with_a_clear_message(broker_url: str, key_prefix: str) -> None:
    env = service_env(broker_url, key_prefix)

    done = run_cli(env, "summarize", "--share-id", "x", "--text", "hi", "--max-words", "3")

    assert done.returncode == 2
    assert "invalid summarize request: options.max_words" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound but not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_unreachable_broker_is_a_clear_error_not_a_silent_drop(
    broker_url: str, key_prefix: str, closed_port: int
) -> None:
    dead = f"amqp://guest:s3cret-broker@127.0.0.1:{closed_port}//"
    settings = Settings(broker_url=dead, redis_url=REDIS_URL, key_prefix=key_prefix)
    with (
        Producer(settings) as p,
        pytest.raises(PublishError, match=r"avocado\.generate not published") as raised,
    ):
        p.generate("Anyone there?")
    assert "s3cret-broker" not in str(raised.value)

    done = run_cli(
        service_env(broker_url, key_prefix, AVOCADO_BROKER_URL=dead), "generate", "Anyone?"
    )
    assert done.returncode == PublishError.exit_code == 69
    assert "avocado: avocado.generate not published" in done.stderr
    assert "Traceback" not in done.stderr
    assert "s3cret-broker" not in done.stderr


def test_unreachable_redis_refuses_jobs_that_need_a_lock(
    producer: Producer, broker_url: str, key_prefix: str, closed_port: int
) -> None:
    dead = f"redis://:s3cret-redis@127.0.0.1:{closed_port}/0"
    settings = Settings(broker_url=broker_url, redis_url=dead, key_prefix=key_prefix)
    with producer.app.connection_for_write() as connection:
        declare_topology(connection, producer.settings)
    summaries = lane_queue(Lane.BATCH)
    before = _depth(producer, summaries)
    with Producer(settings) as p:
        with pytest.raises(PublishError, match=r"avocado\.summarize not published") as raised:
            p.summarize("no-lock", "Without Redis this could run twice.")
        with pytest.raises(PublishError, match=r"avocado\.generate not published"):
            p.generate("Keyed.", idempotency_key="no-lock")
        with pytest.raises(PublishError, match=r"avocado\.generate not published"):
            p.generate("Not even a plain one: its result could not be waited for.")
    assert "s3cret-redis" not in str(raised.value)
    assert _depth(producer, summaries) == before
