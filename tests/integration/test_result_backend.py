"""The fleet's Redis result backend (``avocado_shared.overrides.result_backend``) against a
real Redis: one script stores an outcome, publishes it to waiting clients and never
overwrites a success, as Celery's read-then-write did in two round trips."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery, states

from avocado_shared import Settings
from avocado_shared.celery_config import make_celery
from avocado_shared.overrides.result_backend import FleetRedisBackend, FleetResultConsumer
from tests.conftest import REDIS_URL
from tests.processes import wait_for
from tests.services import RedisServer


def _app(redis_url: str, prefix: str) -> Celery:
    settings = Settings(
        broker_url="amqp://guest@127.0.0.1:5672//", redis_url=redis_url, key_prefix=prefix
    )
    return make_celery("result-backend-test", settings)


@pytest.fixture
def app() -> Iterator[Celery]:
    prefix = f"avocado-test-{uuid.uuid4().hex[:8]}:"
    made = _app(REDIS_URL, prefix)
    yield made
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def _stored(app: Celery, job_id: str) -> tuple[dict[str, object], int]:
    backend = app.backend
    client: redis.Redis = backend.client
    key = backend.get_key_for_task(job_id)
    return json.loads(client.get(key)), client.ttl(key)


def test_an_outcome_is_stored_with_its_expiry_and_published(app: Celery) -> None:
    backend = app.backend
    job_id = str(uuid.uuid4())
    listener = backend.client.pubsub()
    listener.subscribe(backend.get_key_for_task(job_id))
    wait_for(lambda: listener.get_message(timeout=1), timeout=10, what="the subscription")

    backend.store_result(job_id, {"text": "hi"}, states.SUCCESS)

    message = wait_for(lambda: listener.get_message(timeout=1), timeout=10, what="the publish")
    meta, ttl = _stored(app, job_id)
    assert isinstance(backend, FleetRedisBackend)
    assert meta["status"] == states.SUCCESS
    assert meta["result"] == {"text": "hi"}
    assert json.loads(message["data"]) == meta
    assert 0 < ttl <= app.backend.expires
    assert app.AsyncResult(job_id).get(timeout=10) == {"text": "hi"}
    listener.close()


def test_a_success_is_never_overwritten(app: Celery) -> None:
    backend = app.backend
    job_id = str(uuid.uuid4())

    backend.store_result(job_id, None, states.STARTED)
    assert _stored(app, job_id)[0]["status"] == states.STARTED
    backend.store_result(job_id, {"text": "first"}, states.SUCCESS)
    backend.mark_as_failure(job_id, RuntimeError("a lost copy"))
    backend.store_result(job_id, {"text": "second"}, states.SUCCESS)

    meta, _ = _stored(app, job_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"text": "first"})


def test_a_result_stored_while_its_waiter_reconnects_reaches_it(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client waits on a job; its subscription is made again (as after Redis dropped it),
    and the job's result is stored and published just after the consumer read what was
    stored meanwhile (nothing). Subscribed again before that read, the waiter hears the
    publish; subscribed after it (Celery's order), it would wait in vain."""
    backend = app.backend
    consumer = backend.result_consumer
    job_id = str(uuid.uuid4())
    channel = backend.get_key_for_task(job_id)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(app.AsyncResult(job_id).get, timeout=10)
        wait_for(lambda: backend.client.pubsub_numsub(channel)[0][1], timeout=10, what="the waiter")
        read = backend.client.mget

        def read_then_store(keys: object) -> object:
            found = read(keys)
            backend.store_result(job_id, {"text": "meanwhile"}, states.SUCCESS)
            return found

        monkeypatch.setattr(backend.client, "mget", read_then_store)
        consumer._reconnect_pubsub()
        monkeypatch.undo()

        assert isinstance(consumer, FleetResultConsumer)
        assert waiting.result() == {"text": "meanwhile"}


def test_a_handle_dropped_while_redis_is_away_goes_quietly_and_waiters_still_hear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two jobs are waited on; Redis stops; one handle is dropped (its unsubscribe, as
    ``AsyncResult.__del__`` makes it). It neither raises nor logs that the application must
    be restarted (Celery's consumer did both, after reconnecting with retries), and once
    Redis is back the other job's result still reaches its waiter."""
    with RedisServer(tmp_path) as server:
        app = _app(server.url, "avocado-test:")
        backend = app.backend
        dropped, kept = str(uuid.uuid4()), str(uuid.uuid4())
        for job_id in (dropped, kept):
            backend.result_consumer.consume_from(job_id)
        server.stop()
        # As redis-py leaves a connection it found broken (a failed read, a health check):
        # the next command on it connects first.
        backend.result_consumer._pubsub.connection.disconnect()

        with caplog.at_level(logging.WARNING):
            backend.result_consumer.cancel_for(dropped)
        server.start()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(app.AsyncResult(kept).get, timeout=10)
            wait_for(
                lambda: backend.client.pubsub_numsub(backend.get_key_for_task(kept))[0][1],
                timeout=10,
                what="the waiter subscribed again",
            )
            backend.store_result(kept, {"text": "after"}, states.SUCCESS)
            assert waiting.result() == {"text": "after"}
        app.close()

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL] == []


def test_a_waiter_waits_through_a_redis_restart_and_gets_its_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client waits on a job while Redis stops for longer than Celery's reconnect retries,
    and the job's result is stored once Redis is back: the waiter gets it (Celery's consumer
    raised RuntimeError, 'must be restarted', a second into the outage)."""
    with RedisServer(tmp_path) as server:
        app = _app(server.url, "avocado-test:")
        backend = app.backend
        job_id = str(uuid.uuid4())
        channel = backend.get_key_for_task(job_id)
        with caplog.at_level(logging.WARNING), concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(app.AsyncResult(job_id).get, timeout=60)
            wait_for(
                lambda: backend.client.pubsub_numsub(channel)[0][1], timeout=10, what="the waiter"
            )
            server.stop()
            wait_for(
                lambda: waiting.done() or "still lost" in caplog.text,
                timeout=30,
                what="the waiter to find Redis gone, past Celery's retries",
            )
            server.start()
            backend.store_result(job_id, {"text": "after the restart"}, states.SUCCESS)

            assert waiting.result() == {"text": "after the restart"}
        app.close()
