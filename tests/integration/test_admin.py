"""Least-privilege worker users (``avocado admin create-worker``) on a private RabbitMQ 4 node
with its management API and a private Redis with a password: what such a user may do (run
jobs, retry them, announce its endpoint) and what it is refused."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import pytest
import redis
from amqp.exceptions import AccessRefused, NotAllowed
from kombu.connection import Connection

from avocado_shared.admin import WORKER_PERMISSIONS
from avocado_shared.discovery import EndpointEvent, EndpointWatcher
from avocado_shared.producer import Producer
from avocado_shared.settings import Settings
from avocado_shared.topology import DEAD_LETTER_QUEUE, GENERATE_QUEUE, ML_EXCHANGE
from avocado_sim import OllamaSimulator
from tests.conftest import WorkerFactory
from tests.rabbit import RabbitNode
from tests.services import RedisServer, free_port, run_cli, service_env

WAIT = 60
VHOST = "fleet"
OTHER_VHOST = "elsewhere"


@dataclass(frozen=True)
class Fleet:
    """The admin's side: broker, management API and Redis, all with admin credentials."""

    node: RabbitNode
    redis_url: str
    key_prefix: str
    database_url: str

    def broker_url(self, vhost: str = VHOST) -> str:
        return f"amqp://guest:guest@{self.node.host}/{vhost}"

    def admin_env(self) -> dict[str, str]:
        return service_env(
            self.broker_url(),
            self.key_prefix,
            AVOCADO_REDIS_URL=self.redis_url,
            AVOCADO_RABBITMQ_MANAGEMENT_URL=f"http://guest:guest@127.0.0.1:{self.node.mgmt_port}",
            AVOCADO_DATABASE_URL=self.database_url,
        )

    def admin_settings(self) -> Settings:
        return Settings(
            broker_url=self.broker_url(),
            redis_url=self.redis_url,
            key_prefix=self.key_prefix,
            database_url=self.database_url,
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    node = RabbitNode.private(4, port=free_port(), mgmt_port=free_port())
    try:
        node.start()
        node.broker().add_vhosts(VHOST, OTHER_VHOST)
        with RedisServer(tmp_path_factory.mktemp("redis")) as server:
            password = secrets.token_hex(16)
            admin = redis.Redis.from_url(server.url)
            admin.config_set("requirepass", password)  # as a deployed Redis has one
            admin.close()
            database = tmp_path_factory.mktemp("results") / "results.sqlite3"
            yield Fleet(
                node,
                f"redis://:{password}@127.0.0.1:{server.port}/0",
                f"fleet-{uuid.uuid4().hex[:6]}:",
                f"sqlite:///{database}",
            )
    finally:
        node.wipe()


def _create(fleet: Fleet, name: str) -> dict[str, str]:
    done = run_cli(fleet.admin_env(), "admin", "create-worker", name)
    assert done.returncode == 0, done.stderr
    made = dict(line.split("=", 1) for line in done.stdout.splitlines())
    password = made["AVOCADO_BROKER_URL"].split(":")[2].split("@")[0]
    assert password not in done.stderr  # the secrets go to stdout only
    return made


@pytest.fixture(scope="module")
def worker_env(fleet: Fleet) -> Iterator[dict[str, str]]:
    """The secrets ``create-worker`` printed for one notebook; its users deleted afterwards."""
    name = f"nb-{uuid.uuid4().hex[:6]}"
    yield _create(fleet, name)
    run_cli(fleet.admin_env(), "admin", "delete-worker", name)


def _acl_reset(fleet: Fleet) -> None:
    admin = redis.Redis.from_url(fleet.redis_url)
    try:
        admin.acl_log_reset()
    finally:
        admin.close()


def _acl_denials(fleet: Fleet) -> list[str]:
    admin = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    try:
        return [f"{e['reason']} {e['object']}" for e in admin.acl_log()]
    finally:
        admin.close()


def test_worker_user_runs_jobs_retries_and_announces(
    fleet: Fleet, worker_env: dict[str, str], fresh_sim: OllamaSimulator, tmp_path: Path
) -> None:
    sid = f"node-{uuid.uuid4().hex[:6]}"
    admin = Producer(fleet.admin_settings())
    factory = WorkerFactory(worker_env["AVOCADO_BROKER_URL"], fleet.key_prefix, admin, tmp_path)
    seen: list[EndpointEvent] = []
    _acl_reset(fleet)  # the module's other tests are refused on purpose
    try:
        with (
            Connection(fleet.broker_url()) as connection,
            EndpointWatcher(
                connection, on_event=lambda a: seen.append(a.event) if a.service_id == sid else None
            ) as watcher,
        ):
            node = factory(
                fresh_sim.url,
                2,
                **worker_env,
                AVOCADO_DATABASE_URL=fleet.database_url,
                AVOCADO_PUBLIC_URL=fresh_sim.url,
                AVOCADO_SERVICE_ID=sid,
                AVOCADO_NODE_TTL_S="4",
                AVOCADO_NODE_REFRESH_S="1",
                AVOCADO_METRICS_PORT="0",
            )
            assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)

            # The notebook's own check: a job published with the worker's credentials.
            with Producer(
                Settings(
                    broker_url=worker_env["AVOCADO_BROKER_URL"],
                    redis_url=worker_env["AVOCADO_REDIS_URL"],
                    key_prefix=worker_env["AVOCADO_KEY_PREFIX"],
                    declare_topology=False,
                    database_url=fleet.database_url,
                )
            ) as notebook:
                first = notebook.generate("hello", idempotency_key=uuid.uuid4().hex)
                assert first.get(timeout=WAIT).text
            # A transient failure: the retry goes through Celery's delayed-delivery exchanges.
            fresh_sim.config.fail_first = 1
            retried = admin.generate("again", idempotency_key=uuid.uuid4().hex).get(timeout=WAIT)
            assert retried.text
            assert fresh_sim.config.fail_first == 0
            # Beat runs on the admin's side; the re-announce job it sends runs on this worker.
            beat = factory.beat(
                AVOCADO_BROKER_URL=fleet.broker_url(),
                AVOCADO_REDIS_URL=fleet.redis_url,
                AVOCADO_ANNOUNCE_INTERVAL_S="1",
            )
            assert watcher.wait_until(
                lambda _: seen.count(EndpointEvent.CHANGED) >= 3, timeout=WAIT
            )
            beat.stop()

            assert node.stop() == 0
            assert watcher.wait_until(lambda live: sid not in live, timeout=WAIT)
        assert seen[0] is EndpointEvent.CHANGED
        assert seen[-1] is EndpointEvent.REMOVED
        log = node.log_text()
        assert "ACCESS_REFUSED" not in log, log
        assert "NOPERM" not in log, log
        assert "Retry in" in log
        assert re.search(r"Task avocado\.announce\[[^]]+\] succeeded", log)
        assert _acl_denials(fleet) == []
    finally:
        factory.stop_all()
        admin.close()


# What a worker's broker user tries in vain, each on a channel of its own (a refusal closes it).
_BROKER_REFUSALS: dict[str, Callable[[Any], object]] = {
    "delete a job queue": lambda ch: ch.queue_delete(GENERATE_QUEUE),
    "redeclare a job queue": lambda ch: ch.queue_declare(GENERATE_QUEUE, durable=True),
    "declare a queue": lambda ch: ch.queue_declare("stolen-jobs", durable=True),
    "delete the job exchange": lambda ch: ch.exchange_delete(ML_EXCHANGE.name),
    "read the dead letters": lambda ch: ch.basic_get(DEAD_LETTER_QUEUE),
    "write to the dead letters": lambda ch: ch.basic_publish_confirm(
        amqp.Message("x"), exchange="", routing_key=DEAD_LETTER_QUEUE
    ),
    "bind a queue to the job exchange": lambda ch: ch.queue_bind("celeryev.spy", "ml", "#"),
}


@pytest.mark.parametrize("operation", sorted(_BROKER_REFUSALS))
def test_worker_user_is_refused_on_the_broker(worker_env: dict[str, str], operation: str) -> None:
    with Connection(worker_env["AVOCADO_BROKER_URL"]) as connection:
        channel = connection.channel()
        channel.confirm_select()
        with pytest.raises(AccessRefused):
            _BROKER_REFUSALS[operation](channel)


def test_worker_user_is_refused_another_vhost(fleet: Fleet, worker_env: dict[str, str]) -> None:
    url = worker_env["AVOCADO_BROKER_URL"].rsplit("/", 1)[0] + f"/{OTHER_VHOST}"
    with (
        pytest.raises(NotAllowed, match=r"access to vhost .elsewhere. refused"),
        Connection(url) as connection,
    ):
        connection.connect()


def test_purging_a_job_queue_is_not_refused(worker_env: dict[str, str]) -> None:
    """RabbitMQ checks purge against the read permission, the one consuming needs: no
    permission lets a worker take its jobs yet not purge them. This states it, so the warning in
    docs/configuration.md is revisited if RabbitMQ ever changes it."""
    assert "ml\\.generate" in WORKER_PERMISSIONS.read
    with Connection(worker_env["AVOCADO_BROKER_URL"]) as connection:
        assert connection.channel().queue_purge(GENERATE_QUEUE) == 0


def test_worker_user_is_refused_outside_its_redis_prefix(
    fleet: Fleet, worker_env: dict[str, str]
) -> None:
    prefix = worker_env["AVOCADO_KEY_PREFIX"]
    client = redis.Redis.from_url(worker_env["AVOCADO_REDIS_URL"])
    try:
        assert client.set(f"{prefix}probe", "1", ex=60)
        assert client.get(f"{prefix}probe") == b"1"
        refused = [
            lambda: client.get("other:key"),
            lambda: client.set("other:key", "1"),
            lambda: client.delete("other:key"),
            lambda: client.eval("return redis.call('get', KEYS[1])", 1, "other:key"),
            lambda: client.publish("other:channel", "x"),
            lambda: client.keys("*"),
            lambda: client.flushall(),
            lambda: client.config_get("requirepass"),
            lambda: client.acl_list(),
        ]
        for operation in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                operation()
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.execute_command("AUTH", "default", "guessed")
    finally:
        client.close()


def test_delete_worker_cuts_the_user_off(fleet: Fleet) -> None:
    name = f"nb-{uuid.uuid4().hex[:6]}"
    made = _create(fleet, name)
    with Connection(made["AVOCADO_BROKER_URL"]) as connection:
        connection.connect()
    assert redis.Redis.from_url(made["AVOCADO_REDIS_URL"]).ping()

    assert run_cli(fleet.admin_env(), "admin", "delete-worker", name).returncode == 0

    with pytest.raises(AccessRefused), Connection(made["AVOCADO_BROKER_URL"]) as connection:
        connection.connect()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(made["AVOCADO_REDIS_URL"]).ping()
    again = run_cli(fleet.admin_env(), "admin", "delete-worker", name)
    assert again.returncode == 1
    assert "no worker user" in again.stderr


def test_create_worker_refuses_to_take_over_another_user(fleet: Fleet) -> None:
    done = run_cli(fleet.admin_env(), "admin", "create-worker", "guest")
    assert done.returncode == 1
    assert "not a worker user" in done.stderr
    assert not done.stdout
    with Connection(fleet.broker_url()) as connection:
        connection.connect()  # guest's password is unchanged
