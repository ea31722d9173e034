"""Real services for the tests: a Redis key prefix, worker processes, a private Redis."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis

_T = TypeVar("_T")

REDIS_URL = os.environ.get("AVOCADO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
VENV_BIN = Path(sys.executable).parent


def wait_for(
    condition: Callable[[], _T | None], timeout: float = 30.0, what: str = "condition"
) -> _T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0
) -> int:
    """Send ``sig`` and wait for the process to end; then no process of its group is left."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    kill_group(process)
    return int(process.returncode)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process's whole group (started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class WorkerProcess:
    """A real ``celery worker`` subprocess, stopped (or killed) by the test that made it."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(repr=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the worker to end; then no process of its group is left."""
        return stop_group(self.process, sig, timeout)

    def kill(self) -> None:
        """SIGKILL the worker and its pool at once, as when a notebook's machine vanishes."""
        kill_group(self.process)
        self.process.wait(timeout=10)


def service_env(broker_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """The environment a worker or CLI subprocess of this test session runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVOCADO_")}
    env.update(
        {
            "AVOCADO_BROKER_URL": broker_url,
            "AVOCADO_REDIS_URL": REDIS_URL,
            "AVOCADO_KEY_PREFIX": key_prefix,
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def start_worker(
    env: dict[str, str],
    log_dir: Path,
    ping: Callable[[str], bool],
    *,
    concurrency: int = 2,
    queues: str | None = None,
) -> WorkerProcess:
    """Start ``celery -A ollama_worker worker`` and wait until it answers a ping."""
    name = f"test-{uuid.uuid4().hex[:6]}@localhost"
    log = log_dir / f"{name.split('@')[0]}.log"
    args = [
        str(VENV_BIN / "celery"),
        "-A",
        "ollama_worker",
        "worker",
        "--concurrency",
        str(concurrency),
        "--hostname",
        name,
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
    ]
    if queues:
        args += ["--queues", queues]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = WorkerProcess(name=name, process=process, log=log, env=env)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{worker.log_text()}")
        return ping(name)

    try:
        wait_for(ready, timeout=60, what=f"worker {name} to answer a ping")
    except BaseException:
        worker.stop(signal.SIGKILL)
        raise
    return worker


def start_beat(env: dict[str, str], log_dir: Path) -> WorkerProcess:
    """Start ``celery -A ollama_worker beat`` with a schedule file of its own."""
    name = f"beat-{uuid.uuid4().hex[:6]}"
    log = log_dir / f"{name}.log"
    args = [str(VENV_BIN / "celery"), "-A", "ollama_worker", "beat", "--loglevel", "INFO"]
    args += ["--schedule", str(log_dir / f"{name}-schedule")]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    beat = WorkerProcess(name=name, process=process, log=log, env=env)
    wait_for(
        lambda: "beat: Starting" in beat.log_text() or process.poll() is not None,
        timeout=60,
        what="celery beat to start",
    )
    assert process.poll() is None, f"beat exited with {process.returncode}:\n{beat.log_text()}"
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

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
