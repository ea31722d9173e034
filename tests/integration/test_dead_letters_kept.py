"""Reading dead letters never loses one, on RabbitMQ 3.x and 4.x, and an ``ml.dead-letter``
(or a job queue) declared with other arguments is migrated with every message it holds.

The tests share a vhost of their own, and each starts without ``ml.dead-letter``: the
migration deletes and redeclares it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu import Producer as KombuProducer

from avocado_shared import Settings
from avocado_shared.dlq import REASON_HEADER, list_dead_letters, replay
from avocado_shared.redeclare import HOLDING_SUFFIX
from avocado_shared.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    GENERATE_QUEUE,
    ML_EXCHANGE,
    declare_dead_letter_queue,
    declare_topology,
    job_queues,
)
from tests.rabbit import Broker, isolated_vhost

pytestmark = pytest.mark.both_brokers

LETTERS = 5


@pytest.fixture(scope="module")
def vhost_url(rabbit: Broker) -> Iterator[str]:
    with isolated_vhost(rabbit) as url:
        yield url


@pytest.fixture
def connection(vhost_url: str) -> Iterator[Connection]:
    """A connection to the module's vhost, which holds no dead-letter queue yet.

    Publishes wait for the broker's confirm: a quorum queue may answer a read before an
    unconfirmed publish is committed, and a listing would then miss the last letter.
    """
    with Connection(vhost_url, transport_options={"confirm_publish": True}) as made:
        made.ensure_connection(max_retries=3)
        for name in (DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE + HOLDING_SUFFIX):
            made.default_channel.queue_delete(name)
        yield made


def _letters(connection: Connection, count: int = LETTERS) -> list[str]:
    """Publish ``count`` dead letters to ``ml.dlx`` as a worker does; their ids in order."""
    idents = [f"kept-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    producer = KombuProducer(connection.default_channel)
    for ident in idents:
        producer.publish(
            json.dumps({"job": ident}),
            exchange=DEAD_LETTER_EXCHANGE.name,
            routing_key="ml.generate",
            headers={REASON_HEADER: "test: kept", "id": ident, "task": "avocado.generate"},
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            mandatory=True,
        )
    return idents


def _ids(connection: Connection, limit: int = 10_000) -> list[str]:
    return [letter.id for letter in list_dead_letters(connection, limit=limit)]


def _arguments(rabbit: Broker, vhost_url: str, queue: str) -> dict[str, Any] | None:
    found = rabbit.queues(vhost_url.rsplit("/", 1)[1]).get(queue)
    return None if found is None else dict(found["arguments"])


def test_a_hundred_listings_keep_every_letter_in_order_then_replay_removes_one(
    connection: Connection, vhost_url: str
) -> None:
    declare_topology(connection, Settings(broker_url=vhost_url))
    idents = _letters(connection)

    # Whole listings and partial ones (`avocado status` reads the head only), 100 in all.
    seen = [_ids(connection, limit=LETTERS if i % 2 else 2) for i in range(100)]

    assert seen[-1] == idents
    assert all(listing == idents[: len(listing)] for listing in seen)
    letters = list_dead_letters(connection)
    assert all(letter.headers["x-delivery-count"] >= 100 for letter in letters)

    replay(connection, idents[2])

    assert _ids(connection) == idents[:2] + idents[3:]


@pytest.mark.parametrize(
    "old_arguments",
    [
        {"x-queue-type": "quorum"},  # what earlier releases declared
        {"x-queue-type": "quorum", "x-delivery-limit": 20},  # RabbitMQ 4's default, made explicit
    ],
    ids=["earlier-release", "limit-20"],
)
def test_a_dead_letter_queue_declared_otherwise_is_migrated_with_every_letter(
    connection: Connection, vhost_url: str, rabbit: Broker, old_arguments: dict[str, Any]
) -> None:
    old = Queue(
        DEAD_LETTER_QUEUE,
        Exchange(DEAD_LETTER_EXCHANGE.name, type="topic", durable=True),
        routing_key="#",
        durable=True,
        queue_arguments=old_arguments,
    )
    old(connection.default_channel).declare()
    idents = _letters(connection)
    before = {letter.id: letter for letter in list_dead_letters(connection)}

    declare_topology(connection, Settings(broker_url=vhost_url))

    after = list_dead_letters(connection)
    assert [letter.id for letter in after] == idents
    for letter in after:
        assert letter.body_preview == before[letter.id].body_preview
        assert letter.reason == before[letter.id].reason
        assert letter.content_type == "application/json"
    expected = {"x-queue-type": "quorum", **({"x-delivery-limit": -1} if rabbit.major >= 4 else {})}
    assert _arguments(rabbit, vhost_url, DEAD_LETTER_QUEUE) == expected
    assert _arguments(rabbit, vhost_url, DEAD_LETTER_QUEUE + HOLDING_SUFFIX) is None
    # Letters dead-lettered from now on still reach the queue.
    assert _ids(connection) == idents
    late = _letters(connection, 1)
    assert _ids(connection) == idents + late


def test_a_migration_cut_short_is_finished_by_the_next_declare(
    connection: Connection, vhost_url: str, rabbit: Broker
) -> None:
    """The old queue is gone and its letters wait in the holding queue, as when the process
    that migrated died before moving them back."""
    queue = declare_dead_letter_queue(connection)
    channel = connection.default_channel
    channel.queue_delete(queue.name)
    holding = Queue(
        queue.name + HOLDING_SUFFIX,
        queue.exchange,
        routing_key=queue.routing_key,
        durable=True,
        queue_arguments=dict(queue.queue_arguments),
    )
    holding(channel).declare()
    idents = _letters(connection)

    declare_dead_letter_queue(connection)

    assert _ids(connection) == idents
    assert _arguments(rabbit, vhost_url, holding.name) is None


def test_a_job_queue_of_an_earlier_release_is_migrated_with_its_jobs(
    connection: Connection, vhost_url: str, rabbit: Broker
) -> None:
    """``ml.generate`` declared without a dead-letter strategy (at most once) is declared
    anew to dead-letter at least once, its jobs kept in order."""
    settings = Settings(broker_url=vhost_url)
    (new,) = [q for q in job_queues(settings) if q.name == GENERATE_QUEUE]
    old_arguments = {
        k: v
        for k, v in new.queue_arguments.items()
        if k not in ("x-dead-letter-strategy", "x-overflow")
    }
    channel = connection.default_channel
    channel.queue_delete(GENERATE_QUEUE)
    Queue(
        GENERATE_QUEUE,
        ML_EXCHANGE,
        routing_key=GENERATE_QUEUE,
        durable=True,
        queue_arguments=old_arguments,
    )(channel).declare()
    jobs = [f"job-{i}" for i in range(LETTERS)]
    producer = KombuProducer(channel)
    for job in jobs:
        producer.publish(
            job,
            exchange=ML_EXCHANGE.name,
            routing_key=GENERATE_QUEUE,
            delivery_mode=2,
            mandatory=True,
        )

    declare_topology(connection, settings)

    arguments = _arguments(rabbit, vhost_url, GENERATE_QUEUE)
    assert arguments is not None
    assert (arguments["x-dead-letter-strategy"], arguments["x-overflow"]) == (
        "at-least-once",
        "reject-publish",
    )
    kept = []
    while (message := channel.basic_get(GENERATE_QUEUE, no_ack=True)) is not None:
        kept.append(message.body.decode() if isinstance(message.body, bytes) else message.body)
    assert kept == jobs
    assert _arguments(rabbit, vhost_url, GENERATE_QUEUE + HOLDING_SUFFIX) is None
