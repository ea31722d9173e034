"""Processes that tests and benchmarks start: the simulator and the embedded model's server as
subprocesses, Celery workers, and vhosts on the machine's RabbitMQ.

Every process runs in a session of its own, so stopping it leaves none of its children behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import psutil

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "VENV_BIN",
    "Child",
    "Server",
    "WaitTimeout",
    "WorkerProcess",
    "free_port",
    "kill_group",
    "ping",
    "private_vhost",
    "process_runs",
    "rabbitmqctl",
    "service_env",
    "spawn",
    "start_embedded_llm",
    "start_simulator",
    "start_worker",
    "stop_group",
    "wait_for",
    "wait_ready",
]

VENV_BIN = Path(sys.executable).parent
"""Where this interpreter's commands are: ``celery``, ``avocado-ollama-sim``..."""
_T = TypeVar("_T")


class WaitTimeout(AssertionError):
    """What ``wait_for`` waited for did not happen in time (an assertion, for pytest)."""


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
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie does not: here a process whose parent is gone
    may stay one, as init does not reap it at once (scripts/lib.sh's ``alive`` agrees)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


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


def spawn(
    args: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a session of its own, its stdout and stderr written to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            list(args),
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class Child:
    """A subprocess started by ``spawn``, stopped (or killed) by whoever made it."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for it to end; then no process of its group is left."""
        return stop_group(self.process, sig, timeout)

    def kill(self) -> None:
        """SIGKILL it and its children at once, as when a notebook's machine vanishes."""
        kill_group(self.process)
        self.process.wait(timeout=10)

    def check_running(self, what: str) -> None:
        """Raise with its log when it has exited."""
        if not self.alive():
            code = self.process.returncode
            raise RuntimeError(f"{what} exited with {code}:\n{self.log_text()[-4000:]}")


@dataclass
class Server(Child):
    """A server subprocess and the URL it answers on."""

    url: str


@dataclass
class WorkerProcess(Child):
    """A ``celery worker`` subprocess; ``name`` is its node name (pings, remote control)."""

    name: str
    env: dict[str, str] = field(repr=False)


def start_simulator(*args: str, log: Path, cwd: Path | None = None) -> Server:
    """``avocado-ollama-sim --port 0 ARGS`` in a process of its own (its CPU is not the
    caller's GIL), once it has printed the URL it listens on."""
    process = spawn([str(VENV_BIN / "avocado-ollama-sim"), "--port", "0", *args], log, cwd=cwd)
    child = Child(process, log)

    def url() -> str | None:
        child.check_running("avocado-ollama-sim")
        found = re.search(r"listening on (\S+)\n", child.log_text())
        return found.group(1) if found else None

    try:
        return Server(process, log, wait_for(url, 30, "the simulator's address"))
    except BaseException:
        child.stop(timeout=5)
        raise


def start_embedded_llm(
    log: Path, n_ctx: int, *, timeout: float = 180.0, cwd: Path | None = None
) -> Server:
    """The embedded model's server (``avocado-embedded-llm``, as start-ml-services.sh runs it
    without Ollama) on a free port, once it lists its models; ``url`` ends in ``/v1``."""
    port = free_port()
    args = [str(VENV_BIN / "avocado-embedded-llm"), "--port", str(port), "--n-ctx", str(n_ctx)]
    server = Server(spawn(args, log, cwd=cwd), log, f"http://127.0.0.1:{port}/v1")

    def serves() -> bool:
        server.check_running("avocado-embedded-llm")
        try:
            return httpx.get(f"{server.url}/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(serves, timeout, "the embedded model's server")
    except BaseException:
        server.stop()
        raise
    return server


def service_env(broker_url: str, redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a worker or CLI subprocess: this one's without its ``AVOCADO_*``
    settings, these instead, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVOCADO_")}
    env.update(
        {
            "AVOCADO_BROKER_URL": broker_url,
            "AVOCADO_REDIS_URL": redis_url,
            "AVOCADO_KEY_PREFIX": key_prefix,
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def ping(app: Celery, name: str) -> bool:
    """Whether the worker ``name`` answers, asked on a connection of its own: kombu's pools are
    process-wide, and a pooled connection the broker closed would block the ping."""
    from kombu.exceptions import OperationalError

    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            return bool(app.control.ping(destination=[name], timeout=0.5, connection=connection))
    except (OSError, OperationalError):
        return False


def start_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    app: str = "ollama_worker",
    concurrency: int | None = 2,
    pool: str | None = None,
    queues: str | None = None,
    gossip: bool = False,
    prefix: str = "test",
) -> WorkerProcess:
    """Start ``celery -A APP worker`` (``concurrency`` None: the worker's own default, as
    many jobs as its server runs); ``wait_ready`` waits until it answers a ping."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}@localhost"
    args = [str(VENV_BIN / "celery"), "-A", app, "worker"]
    args += [] if concurrency is None else ["--concurrency", str(concurrency)]
    args += ["--hostname", name, "--loglevel", "INFO", "--without-mingle"]
    args += [] if gossip else ["--without-gossip"]
    args += ["--pool", pool] if pool else []
    args += ["--queues", queues] if queues else []
    log = log_dir / f"{name.split('@')[0]}.log"
    return WorkerProcess(spawn(args, log, env=env, cwd=log_dir), log, name, dict(env))


def wait_ready(worker: WorkerProcess, app: Celery, timeout: float = 60.0) -> WorkerProcess:
    """Wait until ``worker`` answers a ping of ``app``; killed when it never does."""

    def ready() -> bool:
        worker.check_running(f"worker {worker.name}")
        return ping(app, worker.name)

    try:
        wait_for(ready, timeout, f"worker {worker.name} to answer a ping")
    except BaseException:
        worker.stop(signal.SIGKILL)
        raise
    return worker


def rabbitmqctl(*args: str, timeout: float = 120.0) -> str:
    """``rabbitmqctl -q ARGS`` against the machine's own RabbitMQ; what it printed."""
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        done = subprocess.run(
            [exe, "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise RuntimeError("rabbitmqctl not found: scripts/test.sh installs RabbitMQ") from None
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


@contextlib.contextmanager
def private_vhost(
    host: str = "127.0.0.1:5672",
    prefix: str = "avocado-test",
    ctl: Callable[..., str] = rabbitmqctl,
) -> Iterator[str]:
    """A new vhost for ``guest`` on the broker at ``host`` (administered by ``ctl``), deleted
    afterwards; yields its AMQP URL."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ctl("add_vhost", vhost)
    try:
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{host}/{vhost}"
    finally:
        ctl("delete_vhost", vhost)
