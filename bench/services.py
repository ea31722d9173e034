"""What a benchmark run needs, made for it and removed after: a RabbitMQ vhost, a Redis key
prefix, a temporary directory (SQLite results, logs), simulators and worker processes."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from kombu import pools as kombu_pools
from kombu.exceptions import OperationalError
from tests.rabbit import machine_broker
from tests.services import VENV_BIN, free_port, stop_group, wait_for

from avocado_shared import Producer, Settings

__all__ = [
    "REPO",
    "BenchEnv",
    "Sim",
    "Worker",
    "terminate_as_interrupt",
]

REPO = Path(__file__).resolve().parent.parent
RABBIT_HOST = os.environ.get("BENCH_RABBIT_HOST", "127.0.0.1:5672")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "llama3.2:1b"


@dataclass
class Sim:
    """An ``avocado-ollama-sim`` subprocess, so its CPU is not the harness's GIL."""

    process: subprocess.Popen[bytes]
    url: str
    args: list[str]

    def stop(self) -> None:
        stop_group(self.process, timeout=10)


@dataclass
class Worker:
    """A ``celery worker`` subprocess in a process group of its own."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    args: list[str]

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def processes(self) -> list[psutil.Process]:
        """The main process and its pool children."""
        try:
            main = psutil.Process(self.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        stop_group(self.process, timeout=30)


@dataclass
class BenchEnv:
    """One run's private services; a context manager that removes all of them on exit."""

    tmp: Path = field(init=False)
    vhost: str = field(init=False)
    broker_url: str = field(init=False)
    key_prefix: str = field(init=False)
    settings: Settings = field(init=False)
    _producer: Producer | None = field(default=None, init=False)
    _sims: list[Sim] = field(default_factory=list, init=False)
    _workers: list[Worker] = field(default_factory=list, init=False)
    _vhost_made: bool = field(default=False, init=False)

    def __enter__(self) -> BenchEnv:
        ident = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"avocado-bench-{ident}-"))
        self.vhost = f"avocado-bench-{ident}"
        self.key_prefix = f"avocado-bench-{ident}:"
        try:
            machine_broker().ctl("add_vhost", self.vhost)
            self._vhost_made = True
            machine_broker().ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        except BaseException:
            self.close()
            raise
        self.broker_url = f"amqp://guest:guest@{RABBIT_HOST}/{self.vhost}"
        self.settings = self.make_settings()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def make_settings(self, **overrides: Any) -> Settings:
        """Producer settings of this run; no ``.env`` is read, nothing of the user's."""
        return Settings(
            _env_file=None,
            broker_url=self.broker_url,
            redis_url=REDIS_URL,
            key_prefix=self.key_prefix,
            sqlite_path=str(self.tmp / "results.sqlite3"),
            default_model=MODEL,
            **overrides,
        )

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.settings)
        return self._producer

    @property
    def sqlite_path(self) -> Path:
        return self.tmp / "results.sqlite3"

    # --- simulators ---

    def start_sim(
        self, *, latency_ms: float = 0.0, parallel: int = 4, jitter_ms: float = 0.0
    ) -> Sim:
        """Start a simulator on a free port and wait for its address."""
        args = [
            str(VENV_BIN / "avocado-ollama-sim"),
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
            "--latency-jitter-ms",
            str(jitter_ms),
            "--parallel",
            str(parallel),
            "--max-queue",
            "1024",
            "--models",
            MODEL,
        ]
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.tmp,
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline().decode() if ready else ""
        if "listening on" not in line:
            stop_group(process, timeout=5)
            raise RuntimeError(f"simulator did not start: {line!r}")
        sim = Sim(process=process, url=line.rsplit(" ", 1)[-1].strip(), args=args)
        self._sims.append(sim)
        return sim

    def start_embedded(self, n_ctx: int) -> Sim:
        """The embedded real model's server (``avocado-embedded-llm``) on a free port, as
        start-ml-services.sh runs it without Ollama; its ``/v1`` URL once it lists models."""
        port = free_port()
        args = [str(VENV_BIN / "avocado-embedded-llm"), "--port", str(port), "--n-ctx", str(n_ctx)]
        log = self.tmp / "embedded-llm.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp
            )
        server = Sim(process=process, url=f"http://127.0.0.1:{port}/v1", args=args)
        self._sims.append(server)

        def serves() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"embedded model exited: {log.read_text(errors='replace')}")
            try:
                return httpx.get(f"{server.url}/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(serves, 180, "the embedded model's server")
        return server

    # --- workers ---

    def worker_env(self, ollama_url: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AVOCADO_", "BENCH_"))}
        env.update(
            {
                "AVOCADO_BROKER_URL": self.broker_url,
                "AVOCADO_REDIS_URL": REDIS_URL,
                "AVOCADO_KEY_PREFIX": self.key_prefix,
                "AVOCADO_SQLITE_PATH": str(self.sqlite_path),
                "AVOCADO_OLLAMA_URL": ollama_url,
                "AVOCADO_DEFAULT_MODEL": MODEL,
                "XDG_DATA_HOME": str(self.tmp),
                "TMPDIR": str(self.tmp),
                # Each worker serves its Prometheus metrics, as deployed, on a port of its own.
                "AVOCADO_METRICS_PORT": str(free_port()),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
                ),
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        env.update(extra)
        return env

    def start_worker(
        self,
        *,
        app: str = "ollama_worker",
        pool: str = "prefork",
        concurrency: int = 4,
        ollama_url: str = "http://127.0.0.1:9",
        queues: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        loglevel: str = "INFO",
    ) -> Worker:
        """``celery -A APP worker`` with an explicit pool and concurrency; waits for a ping.

        The pool goes into ``AVOCADO_WORKER_POOL`` as well as ``--pool``: the fleet's app sets
        ``worker_pool`` from that setting, and Celery then ignores ``--pool prefork``.
        """
        name = f"bench-{uuid.uuid4().hex[:6]}@localhost"
        log = self.tmp / f"{name.split('@')[0]}.log"
        args = [
            str(VENV_BIN / "celery"),
            "-A",
            app,
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            name,
            "--loglevel",
            loglevel,
            "--without-mingle",
        ]
        if queues:
            args += ["--queues", queues]
        with log.open("wb") as out:
            process = subprocess.Popen(
                args,
                env=self.worker_env(ollama_url, **{"AVOCADO_WORKER_POOL": pool, **(env or {})}),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.tmp,
            )
        worker = Worker(name=name, process=process, log=log, args=args)
        self._workers.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Worker, timeout: float = 90) -> None:
        def ready() -> bool:
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
            return self.ping(worker.name)

        wait_for(ready, timeout, f"worker {worker.name}")

    def ping(self, name: str) -> bool:
        try:
            with self._control_connection() as connection:
                return bool(
                    self.producer.app.control.ping(
                        destination=[name], timeout=0.5, connection=connection
                    )
                )
        except (OSError, OperationalError):
            return False

    def control(self, worker: Worker, command: str, **arguments: Any) -> None:
        """A remote-control command (``add_consumer``, ``cancel_consumer``), answered."""
        deadline = time.monotonic() + 60
        while True:
            try:
                with self._control_connection() as connection:
                    replies = self.producer.app.control.broadcast(
                        command,
                        arguments=arguments,
                        destination=[worker.name],
                        reply=True,
                        timeout=5,
                        connection=connection,
                    )
            except (OSError, OperationalError):  # the broker restarted
                replies = []
            if replies:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker.name} did not answer {command}")
            time.sleep(1)

    def _control_connection(self) -> Any:
        """A connection of its own: kombu's pools are process-wide, shared by every app with
        the same URL, and a stale or exhausted pool would block a ping forever."""
        connection = self.producer.app.connection_for_write()
        connection.ensure_connection(max_retries=1)
        return connection

    def refresh(self) -> None:
        """Between scenarios: a new producer on new pools, none of it idle for minutes (the
        broker drops connections that miss heartbeats)."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close()
            self._producer = None
        kombu_pools.reset()

    def stop_worker(self, worker: Worker) -> None:
        worker.stop()
        if worker in self._workers:
            self._workers.remove(worker)

    # --- RabbitMQ and Redis ---

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those delivered and unacked)."""
        with self.producer.app.connection_for_read() as connection:
            channel = connection.default_channel
            _, messages, _ = channel.queue_declare(queue, passive=True)
            return int(messages)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(REDIS_URL)

    def purge_results(self) -> None:
        """Delete every Redis key of this run (results, locks) between scenarios."""
        client = self.redis()
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{self.key_prefix}*", count=2000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        finally:
            client.close()

    def reset(self) -> None:
        """After a failed scenario: stop its leftovers, empty the queues, reconnect."""
        for worker in list(self._workers):
            self.stop_worker(worker)
        for sim in self._sims:
            sim.stop()
        self._sims.clear()
        self.refresh()
        with contextlib.suppress(Exception), self.producer.app.connection_for_write() as conn:
            for queue in ("ml.generate", "bench.noop"):
                with contextlib.suppress(Exception):
                    conn.default_channel.queue_purge(queue)
        with contextlib.suppress(Exception):
            self.purge_results()

    # --- the end ---

    def close(self) -> None:
        """Stop every process started here, drop the vhost and the keys, remove the files."""
        for worker in reversed(self._workers):
            with contextlib.suppress(Exception):
                worker.stop()
        self._workers.clear()
        for sim in self._sims:
            with contextlib.suppress(Exception):
                sim.stop()
        self._sims.clear()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close()
            self._producer = None
        with contextlib.suppress(Exception):
            self.purge_results()
        if self._vhost_made:
            with contextlib.suppress(Exception):
                machine_broker().ctl("delete_vhost", self.vhost)
            self._vhost_made = False
        if getattr(self, "tmp", None) is not None and os.environ.get("BENCH_KEEP_TMP") != "1":
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM to the harness cleans up like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
