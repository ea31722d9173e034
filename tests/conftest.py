"""Fixtures: real RabbitMQ (own vhost), Redis (own key prefix), the Ollama simulator, workers."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from avocado_shared import Producer, Settings
from ollama_worker.testing import OllamaSimulator, SimConfig
from tests.services import (
    REDIS_URL,
    WorkerProcess,
    isolated_vhost,
    service_env,
    start_worker,
)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A RabbitMQ vhost of this test session only."""
    with isolated_vhost() as url:
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


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    """One simulator per test module; tests reset what they change."""
    with OllamaSimulator(SimConfig(models=["llama3.2:1b"])) as server:
        yield server


@pytest.fixture
def fresh_sim(sim: OllamaSimulator) -> OllamaSimulator:
    """The module's simulator with its request log cleared and faults off."""
    sim.clear()
    sim.config.fail_first = 0
    return sim


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def worker_factory(
    broker_url: str, key_prefix: str, producer: Producer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerFactory]:
    """Start real worker subprocesses; every one still running is stopped at teardown."""
    started: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("workers")

    def ping(name: str) -> bool:
        return bool(producer.app.control.ping(destination=[name], timeout=0.5))

    def make(ollama_url: str, concurrency: int = 2, **env: str) -> WorkerProcess:
        extra = {"AVOCADO_OLLAMA_URL": ollama_url, "AVOCADO_RETRY_BACKOFF_MAX_S": "1", **env}
        worker = start_worker(
            service_env(broker_url, key_prefix, **extra),
            Path(log_dir),
            ping,
            concurrency=concurrency,
        )
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def worker(worker_factory: WorkerFactory, sim: OllamaSimulator) -> WorkerProcess:
    """One worker of this module, on the module's simulator, 2048-token summary context."""
    return worker_factory(sim.url, AVOCADO_SUMMARY_NUM_CTX="2048")
