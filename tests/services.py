"""Real services for the tests: a Redis key prefix, worker processes, a private Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
from celery import Celery

from tests import processes
from tests.processes import (
    VENV_BIN,
    WorkerProcess,
    free_port,
    kill_group,
    spawn,
    stop_group,
    wait_for,
)

__all__ = [
    "REDIS_URL",
    "VENV_BIN",
    "RedisServer",
    "WorkerProcess",
    "compose_env",
    "free_port",
    "kill_group",
    "run_cli",
    "service_env",
    "start_beat",
    "start_worker",
    "stop_group",
    "wait_for",
]

REDIS_URL = os.environ.get("AVOCADO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# What the compose files interpolate and the scripts read.
_COMPOSE_VARIABLES = (
    "AVOCADO_",
    "RABBITMQ_",
    "REDIS_",
    "POSTGRES_",
    "COMPOSE_",
    "OLLAMA_",
    "NGROK_",
    "PROMETHEUS_",
    "GRAFANA_",
    "PYTHON_IMAGE",
)


def compose_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything the compose files or the scripts read
    (none of the developer's settings reaches a test's stack), and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_COMPOSE_VARIABLES)}
    env.update(extra)
    return env


def service_env(broker_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """The environment a worker or CLI subprocess of this test session runs with: workers
    follow their server's models every half second (5 s by default), so a test that needs a
    node to take another model on waits that long at most."""
    fast = {"AVOCADO_MODELS_REFRESH_S": "0.5"}
    return processes.service_env(broker_url, REDIS_URL, key_prefix, **{**fast, **extra})


def start_worker(
    env: dict[str, str], log_dir: Path, app: Celery, *, concurrency: int = 2
) -> WorkerProcess:
    """Start ``celery -A ollama_worker worker`` and wait until it answers ``app``'s ping."""
    worker = processes.start_worker(env, log_dir, concurrency=concurrency)
    return processes.wait_ready(worker, app)


def start_beat(env: dict[str, str], log_dir: Path) -> WorkerProcess:
    """Start ``celery -A ollama_worker beat`` with a schedule file of its own."""
    name = f"beat-{uuid.uuid4().hex[:6]}"
    log = log_dir / f"{name}.log"
    args = [str(VENV_BIN / "celery"), "-A", "ollama_worker", "beat", "--loglevel", "INFO"]
    args += ["--schedule", str(log_dir / f"{name}-schedule")]
    beat = WorkerProcess(spawn(args, log, env=env), log, name, env)
    wait_for(
        lambda: "beat: Starting" in beat.log_text() or not beat.alive(),
        timeout=60,
        what="celery beat to start",
    )
    beat.check_running("celery beat")
    return beat


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``avocado`` command as a user would."""
    return subprocess.run(
        [str(VENV_BIN / "avocado"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class RedisServer:
    """A private ``redis-server`` with an append-only file, to stop and start in a test
    without touching the machine's Redis; it keeps its data across restarts, as a
    deployed Redis with persistence does."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers."""
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, timeout=30, what=f"redis-server on port {self.port}")
        client.close()
        return self

    def stop(self) -> None:
        """Stop it as a service manager would (SIGTERM), and wait until it is gone."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None

    def down_until(
        self, back: Callable[[], bool], what: str, *, kill: bool = False, timeout: float = 90
    ) -> None:
        """Stop it (SIGTERM), or with ``kill`` SIGKILL it as a crash does, until ``back()``
        holds; then start it again from its append-only file."""
        if kill and self._process is not None:
            self._process.kill()
            self._process.wait(timeout=30)
            self._process = None
        self.stop()
        wait_for(back, timeout=timeout, what=what)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
