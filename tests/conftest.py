"""Fixtures: real RabbitMQ (own vhost), Redis (own key prefix), PostgreSQL (own database),
the Ollama simulator, workers."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from kombu.connection import Connection
from psycopg import sql
from selenium.webdriver import Chrome

from avocado_infer import InferSettings
from avocado_shared import Producer, Settings
from avocado_shared.discovery import Announcement, EndpointWatcher
from avocado_shared.keys import KeyStore
from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.ollama import OllamaClient
from tests import midanswer
from tests.browser import chromium
from tests.fake_gateway import Served, serve
from tests.gateway import InProcessGateway
from tests.gateway_clients import Fleet
from tests.inprocess import InProcessWorker, given_settings
from tests.placement import place
from tests.rabbit import (
    Broker,
    RabbitNode,
    isolated_vhost,
    machine_broker,
    rabbitmq4,
    wipe_orphans,
)
from tests.services import (
    REDIS_URL,
    WorkerProcess,
    free_port,
    service_env,
    start_beat,
    start_worker,
)

PG_ADMIN_URL = os.environ.get(
    "AVOCADO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Trust auth ignores it; it is there so the tests can check it never shows.
PG_FAKE_PASSWORD = "not-shown-3f9a1c"

_DATA_HOME = "AVOCADO_TEST_DATA_HOME"
BROKERS = ("rabbitmq3", "rabbitmq4")


def pytest_configure(config: pytest.Config) -> None:
    """Default SQLite results of this session go to a directory of its own, not the user's."""
    home = tempfile.mkdtemp(prefix="avocado-test-data-")
    os.environ["XDG_DATA_HOME"] = os.environ[_DATA_HOME] = home


def pytest_sessionstart(session: pytest.Session) -> None:
    """Private RabbitMQ nodes an earlier session left behind when it was killed go first."""
    if not hasattr(session.config, "workerinput"):  # once, in the controller
        for name in wipe_orphans():
            print(f"wiped RabbitMQ node {name}: its test process is gone")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop(_DATA_HOME, ""), ignore_errors=True)


# The title of the report sections a test adds to be shown even when it passes
# (request.node.add_report_section("call", SHOWN, text)): what CI's log must hold.
SHOWN = "shown"


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, each module with a server of its own first in a worker's share."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        items[:] = place(items, int(workers))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_brokers`` run on RabbitMQ 3.x and 4.x, the others on the machine's."""
    if "rabbit" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker("both_brokers") is not None
        labels = BROKERS if marked else BROKERS[:1]
        metafunc.parametrize("rabbit", labels, indirect=True, scope="session")


@pytest.fixture(scope="session")
def rabbit(request: pytest.FixtureRequest) -> Broker:
    """The RabbitMQ of this test: the machine's 3.x, or the suite's 4.x node."""
    return _broker(request.param)


def _broker(label: str) -> Broker:
    return rabbitmq4() if label == "rabbitmq4" else machine_broker()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say how the tests of each RabbitMQ version ended, so CI shows both were run; and the
    sections titled SHOWN of passed tests (reports carry them from xdist's workers)."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller says it
        return
    for report in terminalreporter.stats.get("passed", []):
        for title, text in report.sections:
            if title.startswith(f"Captured {SHOWN} "):  # pytest titles it so
                terminalreporter.write_sep("-", f"{report.nodeid}: {title}")
                terminalreporter.write_line(text)
    for label in BROKERS:
        counts = {
            outcome: sum(f"[{label}" in r.nodeid or f"-{label}" in r.nodeid for r in reports)
            for outcome in ("passed", "failed", "error")
            if (reports := terminalreporter.stats.get(outcome, []))
        }
        if any(counts.values()):
            version = _broker(label).version()
            text = ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n)
            terminalreporter.write_line(f"RabbitMQ {version} ({label}): {text}")


@pytest.fixture
def private_node(rabbit: Broker) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test only, of the same version as ``rabbit``, to stop or kill;
    its data is deleted afterwards."""
    with RabbitNode.private(rabbit.major, free_port()).running() as node:
        yield node


@pytest.fixture(scope="session")
def broker_url(rabbit: Broker) -> Iterator[str]:
    """A RabbitMQ vhost of this test session only."""
    with isolated_vhost(rabbit) as url:
        yield url


@pytest.fixture
def idle_vhost(rabbit: Broker) -> Iterator[str]:
    """A vhost of this test only, with no worker consuming; set up before the test's
    gateways, so deleted after they stop."""
    with isolated_vhost(rabbit) as url:
        yield url


@pytest.fixture(scope="session")
def key_prefix() -> str:
    """The Redis key prefix of this test session only."""
    return f"avocado-test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def settings(broker_url: str, key_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, redis_url=REDIS_URL, key_prefix=key_prefix)


@pytest.fixture(scope="session")
def producer(settings: Settings) -> Iterator[Producer]:
    with Producer(settings) as made:
        yield made


def _with_database(url: str, dbname: str) -> str:
    """``url`` pointing at ``dbname``, carrying a password the tests look for in output."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user or 'postgres'}:{PG_FAKE_PASSWORD}@{host}"
    return urlunsplit((parts.scheme, netloc, f"/{dbname}", parts.query, ""))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test session only, dropped at the end; yields its URL."""
    name = f"avocado_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL ({PG_ADMIN_URL}) does not answer: {error}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _with_database(PG_ADMIN_URL, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty results database of each kind: a fresh SQLite file, or the session's
    PostgreSQL database with the tables of the previous test dropped."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite3'}"
    url: str = request.getfixturevalue("pg_database")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS ml_results, ml_results_schema, alembic_version")
    return url


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    """One simulator per test module; tests reset what they change."""
    with OllamaSimulator(SimConfig(models=["llama3.2:1b"])) as server:
        yield server


@pytest.fixture
def midanswer_sim() -> Iterator[OllamaSimulator]:
    """A slow simulator of one test (``tests.midanswer``): a job is caught in the middle of
    its answer."""
    with midanswer.slow() as server:
        yield server


@pytest.fixture(scope="module")
def uninterrupted() -> Iterator[OllamaClient]:
    """The same simulated model at full speed: the answers a job must end up with."""
    with midanswer.reference() as client:
        yield client


@pytest.fixture
def fresh_sim(sim: OllamaSimulator) -> OllamaSimulator:
    """The module's simulator with its request log cleared and faults off."""
    sim.clear()
    sim.config.fail_first = 0
    return sim


class WorkerFactory:
    """Starts real workers, in this process or as subprocesses, and beat subprocesses;
    ``stop_all`` ends every one still running."""

    def __init__(self, broker_url: str, key_prefix: str, producer: Producer, log_dir: Path):
        self.broker_url = broker_url
        self.key_prefix = key_prefix
        self.producer = producer
        self.log_dir = log_dir
        self.started: list[WorkerProcess | InProcessWorker] = []

    def __call__(self, ollama_url: str, concurrency: int = 2, **env: str) -> InProcessWorker:
        """A worker on ``ollama_url`` in this process, consuming; ``env`` adds AVOCADO_*
        settings (metrics off unless asked for)."""
        environment = self._environment(ollama_url, {"AVOCADO_METRICS_PORT": "0", **env})
        worker = InProcessWorker(given_settings(environment), concurrency)
        self.started.append(worker)
        return worker.start()

    def process(self, ollama_url: str, concurrency: int = 2, **env: str) -> WorkerProcess:
        """A worker subprocess, answering pings: for a test that kills it, signals it or
        reads what its own process does."""
        environment = self._environment(ollama_url, env)
        worker = start_worker(environment, self.log_dir, self.producer.app, concurrency=concurrency)
        self.started.append(worker)
        return worker

    def _environment(self, ollama_url: str, env: dict[str, str]) -> dict[str, str]:
        extra = {"AVOCADO_OLLAMA_URL": ollama_url, "AVOCADO_RETRY_BACKOFF_MAX_S": "1", **env}
        return service_env(self.broker_url, self.key_prefix, **extra)

    def beat(self, **env: str) -> WorkerProcess:
        """``celery beat`` of the worker app, started."""
        beat = start_beat(service_env(self.broker_url, self.key_prefix, **env), self.log_dir)
        self.started.append(beat)
        return beat

    def stop_all(self) -> None:
        for started in self.started:
            started.stop()


@contextmanager
def worker_processes(
    broker_url: str, key_prefix: str, producer: Producer, log_dir: Path
) -> Iterator[WorkerFactory]:
    """A factory whose every process still running is stopped on exit."""
    factory = WorkerFactory(broker_url, key_prefix, producer, log_dir)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def worker_factory(
    broker_url: str, key_prefix: str, producer: Producer, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Workers of one test, stopped when it ends so they never take another test's jobs."""
    with worker_processes(broker_url, key_prefix, producer, tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def worker(
    broker_url: str,
    key_prefix: str,
    producer: Producer,
    sim: OllamaSimulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InProcessWorker]:
    """One worker of this module, on the module's simulator, 2048-token summary context."""
    log_dir = tmp_path_factory.mktemp("workers")
    with worker_processes(broker_url, key_prefix, producer, log_dir) as make:
        yield make(sim.url, AVOCADO_SUMMARY_NUM_CTX="2048")


@pytest.fixture
def events(broker_url: str) -> Iterator[tuple[EndpointWatcher, list[Announcement]]]:
    """A watcher bound before the test starts anything, and every announcement it saw."""
    seen: list[Announcement] = []
    with (
        Connection(broker_url) as connection,
        EndpointWatcher(connection, on_event=seen.append) as watcher,
    ):
        yield watcher, seen


@pytest.fixture
def keys(settings: Settings) -> Iterator[KeyStore]:
    """The gateway's API keys in the session's Redis, under its key prefix."""
    with KeyStore.from_settings(settings) as store:
        yield store


@pytest.fixture
def gateway_factory(settings: Settings) -> Iterator[Callable[..., InProcessGateway]]:
    """Gateways (avocado-infer) of one test on the session's broker and Redis, in this
    process; ``fields`` set InferSettings (``fleet`` replaces the fleet settings; API keys
    are not asked for unless ``require_keys=True``). Each is stopped when the test ends."""
    started: list[InProcessGateway] = []

    def make(**fields: Any) -> InProcessGateway:
        chosen = {"fleet": settings, "require_keys": False, **fields}
        gateway = InProcessGateway(InferSettings(**chosen))
        started.append(gateway.start())
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


@pytest.fixture
def fleet(
    worker: InProcessWorker,
    producer: Producer,
    gateway_factory: Callable[..., InProcessGateway],
) -> Fleet:
    """A gateway of one test before the module's worker, and the job ids it answers with."""
    return Fleet(gateway_factory(), producer)


@pytest.fixture
def browser() -> Iterator[Chrome]:
    """Debian's headless Chromium, driven by Selenium (``tests/browser.py``)."""
    with chromium() as driver:
        yield driver


@pytest.fixture
def served() -> Iterator[Callable[..., Served]]:
    """Gateway apps on a fake gateway (``tests/fake_gateway.py``): no broker, Redis or worker;
    ``fields`` set InferSettings. Their test clients are closed when the test ends."""
    made: list[Served] = []

    def make(**fields: Any) -> Served:
        made.append(serve(**fields))
        return made[-1]

    yield make
    for one in made:
        one.client.close()
