"""TLS end to end: jobs, locks, results, announcements, beat, Flower and the CLI through
``amqps://`` (a RabbitMQ 4 TLS listener) and ``rediss://`` (a Redis TLS port), both requiring
the client certificate; a wrong CA or host name fails within seconds, saying why."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from avocado_shared import Producer, Settings
from avocado_shared.discovery import Announcement, EndpointEvent, EndpointWatcher
from avocado_shared.producer import PublishError
from avocado_shared.registry import NodeRegistry
from avocado_shared.store import JobStatus
from avocado_sim import OllamaSimulator
from tests.services import (
    VENV_BIN,
    WorkerProcess,
    free_port,
    run_cli,
    service_env,
    start_beat,
    start_worker,
    stop_group,
    wait_for,
)
from tests.tls import (
    UNNAMED_HOST,
    Certificates,
    TlsRabbit,
    make_certificates,
    tls_rabbit,
    tls_redis,
)

WAIT = 60
# A certificate that does not verify must fail in seconds; retrying would take minutes.
FAST = 15.0


@dataclass(frozen=True)
class Fleet:
    """The TLS broker and Redis of this module, and how to reach them."""

    certs: Certificates
    rabbit: TlsRabbit
    broker_url: str
    redis_url: str
    key_prefix: str

    def settings(self, **changes: object) -> Settings:
        fields: dict[str, object] = {
            "broker_url": self.broker_url,
            "redis_url": self.redis_url,
            "key_prefix": self.key_prefix,
            "tls_ca_file": self.certs.ca,
            "tls_cert_file": self.certs.client_cert,
            "tls_key_file": self.certs.client_key,
        }
        return Settings.model_validate(fields | changes)

    def env(self, **extra: str) -> dict[str, str]:
        tls = {
            "AVOCADO_REDIS_URL": self.redis_url,
            "AVOCADO_TLS_CA_FILE": str(self.certs.ca),
            "AVOCADO_TLS_CERT_FILE": str(self.certs.client_cert),
            "AVOCADO_TLS_KEY_FILE": str(self.certs.client_key),
        }
        return service_env(self.broker_url, self.key_prefix, **(tls | extra))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, key_prefix: str) -> Iterator[Fleet]:
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    with tls_rabbit(certs) as rabbit, tls_redis(certs, tmp_path_factory.mktemp("redis")) as url:
        vhost = f"avocado-tls-{uuid.uuid4().hex[:8]}"
        rabbit.node.broker().add_vhosts(vhost)
        yield Fleet(certs, rabbit, rabbit.url(vhost), url, key_prefix)


@pytest.fixture(scope="module")
def producer(fleet: Fleet) -> Iterator[Producer]:
    with Producer(fleet.settings()) as made:
        yield made


def _worker(
    fleet: Fleet, producer: Producer, sim: OllamaSimulator, log_dir: Path, **env: str
) -> WorkerProcess:
    environment = fleet.env(AVOCADO_OLLAMA_URL=sim.url, **env)
    return start_worker(environment, log_dir, producer.app, concurrency=1)


def test_jobs_locks_and_results_through_amqps_and_rediss(
    fleet: Fleet, producer: Producer, sim: OllamaSimulator, tmp_path: Path
) -> None:
    share_id = f"tls-{uuid.uuid4().hex[:8]}"
    lock_redis = redis.Redis.from_url(fleet.redis_url, **_client_tls(fleet.certs))
    # Submitted twice before any worker runs: the second finds the first's lock in Redis.
    first = producer.summarize(share_id, "TLS keeps the notebook's jobs private on the way.")
    again = producer.summarize(share_id, "TLS keeps the notebook's jobs private on the way.")
    assert again.id == first.id
    assert lock_redis.keys(f"{fleet.key_prefix}lock:*")

    worker = _worker(fleet, producer, sim, tmp_path)
    try:
        result = first.get(timeout=WAIT)  # from the result backend, over rediss://
        assert result.summary
        row = producer.results.get(first.id)
        assert row is not None
        assert row.status is JobStatus.SUCCESS
        wait_for(lambda: not lock_redis.keys(f"{fleet.key_prefix}lock:*"), what="lock released")

        # Every connection to the node came through TLS, with our client certificate.
        connections = fleet.rabbit.node.ctl(
            "list_connections", "--no-table-headers", "ssl", "peer_cert_subject"
        )
        lines = [line.split("\t") for line in connections.strip().splitlines()]
        assert lines, connections
        assert all(ssl == "true" and "CN=client" in subject for ssl, subject in lines), lines
    finally:
        worker.stop()
        lock_redis.close()


def test_announcements_beat_cli_and_flower_through_tls(
    fleet: Fleet, producer: Producer, sim: OllamaSimulator, tmp_path: Path
) -> None:
    sid = f"tls-node-{uuid.uuid4().hex[:8]}"
    seen: list[Announcement] = []
    started: list[WorkerProcess] = []
    flower: subprocess.Popen[bytes] | None = None
    node_env = {"AVOCADO_PUBLIC_URL": sim.url, "AVOCADO_SERVICE_ID": sid}
    node_env |= {"AVOCADO_NODE_TTL_S": "4", "AVOCADO_NODE_REFRESH_S": "1"}
    node_env["AVOCADO_ANNOUNCE_INTERVAL_S"] = "1"
    with (
        producer.app.connection_for_read() as connection,
        EndpointWatcher(connection, on_event=seen.append) as watcher,
    ):
        try:
            started.append(_worker(fleet, producer, sim, tmp_path, **node_env))
            assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
            registry = NodeRegistry.from_settings(fleet.settings())
            try:
                record = registry.get(sid)
            finally:
                registry.close()
            assert record is not None
            assert record.url == sim.url

            listed = run_cli(fleet.env(), "endpoints", "--json")
            assert listed.returncode == 0, listed.stderr
            assert sid in listed.stdout

            # Beat publishes infra.announce over TLS; the worker re-announces the live node.
            announced = _changes(seen, sid)
            started.append(start_beat(fleet.env(AVOCADO_ANNOUNCE_INTERVAL_S="1"), tmp_path))
            assert watcher.wait_until(lambda _: _changes(seen, sid) > announced, timeout=WAIT)

            port = free_port()
            command = [str(VENV_BIN / "celery"), "-A", "ollama_worker", "flower"]
            with (tmp_path / "flower.log").open("wb") as log:
                flower = subprocess.Popen(
                    [*command, "--address=127.0.0.1", f"--port={port}"],
                    env=fleet.env(FLOWER_BASIC_AUTH="tls:flower-secret"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            name = started[0].name
            wait_for(
                lambda: _flower_lists(port, name, flower), timeout=WAIT, what="Flower's workers"
            )
        finally:
            if flower is not None:
                stop_group(flower)
            for process in reversed(started):
                process.stop()


def test_a_wrong_ca_fails_fast_with_a_clear_message(fleet: Fleet, tmp_path: Path) -> None:
    wrong = fleet.settings(tls_ca_file=fleet.certs.other_ca)
    began = time.monotonic()
    with Producer(wrong) as producer, pytest.raises(PublishError) as raised:
        producer.generate("never published")
    assert time.monotonic() - began < FAST
    assert "certificate did not verify" in str(raised.value)

    env = fleet.env(AVOCADO_TLS_CA_FILE=str(fleet.certs.other_ca))
    began = time.monotonic()
    cli = run_cli(env, "generate", "never published", timeout=FAST * 2)
    assert cli.returncode == PublishError.exit_code
    assert time.monotonic() - began < FAST
    assert cli.stderr.startswith("avocado: avocado.generate not published: ")
    assert "certificate did not verify" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert "guest:guest" not in cli.stderr

    # A worker exits, saying why, instead of retrying the broker for minutes.
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(VENV_BIN / "celery"), "-A", "ollama_worker", "worker", "--loglevel", "INFO"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert worker.wait(timeout=FAST * 2) != 0
    finally:
        stop_group(worker)
    text = log.read_text()
    assert "worker not started: the broker's TLS certificate did not verify" in text, text

    registry = NodeRegistry.from_settings(wrong)
    began = time.monotonic()
    try:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            registry.live()
    finally:
        registry.close()
    assert time.monotonic() - began < FAST


def test_a_host_the_certificate_does_not_name_fails_fast(fleet: Fleet) -> None:
    vhost = fleet.broker_url.rsplit("/", 1)[1]
    other_broker = fleet.rabbit.url(vhost, host=UNNAMED_HOST)
    with (
        Producer(fleet.settings(broker_url=other_broker)) as producer,
        pytest.raises(PublishError, match="did not verify: IP address mismatch"),
    ):
        producer.generate("never published")

    other_redis = fleet.redis_url.replace("127.0.0.1", UNNAMED_HOST)
    registry = NodeRegistry.from_settings(fleet.settings(redis_url=other_redis))
    try:
        with pytest.raises(redis.ConnectionError, match="IP address mismatch"):
            registry.live()
    finally:
        registry.close()


def _client_tls(certs: Certificates) -> dict[str, str]:
    return {
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
    }


def _changes(seen: list[Announcement], sid: str) -> int:
    return sum(a.service_id == sid and a.event is EndpointEvent.CHANGED for a in seen)


def _flower_lists(port: int, worker: str, flower: subprocess.Popen[bytes]) -> bool:
    """Flower, on the TLS broker, sees the worker (``refresh`` asks the workers)."""
    if flower.poll() is not None:
        raise AssertionError(f"Flower exited with {flower.returncode}")
    try:
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/workers",
            params={"refresh": "1"},
            auth=("tls", "flower-secret"),
            timeout=10,
        )
    except httpx.TransportError:
        return False
    return response.status_code == 200 and worker in response.json()


def test_failover_checks_each_brokers_own_host_name(fleet: Fleet) -> None:
    """kombu writes the host of its first attempt into the TLS options every connection
    shares; the node it fails over to must still be checked against its own name."""
    parts = urlsplit(fleet.broker_url)
    down = f"{UNNAMED_HOST}:{free_port()}"  # nothing listens there: the first attempt fails
    first = urlunsplit(
        parts._replace(netloc=parts.netloc.replace(parts.netloc.split("@")[1], down))
    )
    settings = fleet.settings(broker_url=f"{first};{fleet.broker_url}")

    with Producer(settings) as producer, producer.app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3, interval_start=0, interval_step=0.1)
        assert connection.connection.server_properties["version"]
        assert f"127.0.0.1:{fleet.rabbit.tls_port}" in connection.as_uri()
        assert producer.app.conf.broker_use_ssl["server_hostname"] is None
