"""What a benchmark run needs, made for it and removed after: a RabbitMQ vhost, a Redis key
prefix, a temporary directory (SQLite results, logs), simulators and worker processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import redis
from kombu import pools as kombu_pools
from kombu.exceptions import OperationalError

from avocado_shared import Producer, ResultStore, Settings
from avocado_shared.keys import KeyStore
from avocado_shared.routing import WANTED_MODELS, Lane, lane_queue_name
from tests import processes as procs

__all__ = ["MODEL", "RABBIT_HOST", "REDIS_URL", "REPO", "BenchEnv", "process_tree"]

REPO = Path(__file__).resolve().parent.parent
RABBIT_HOST = os.environ.get("BENCH_RABBIT_HOST", "127.0.0.1:5672")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "llama3.2:1b"
# Where the fleet's jobs for MODEL wait: the producer publishes to the batch lane.
JOB_QUEUE = lane_queue_name(MODEL, Lane.BATCH)
_C = TypeVar("_C", bound=procs.Child)


def process_tree(worker: procs.Child) -> list[psutil.Process]:
    """The worker's main process and its pool children."""
    try:
        main = psutil.Process(worker.pid)
        return [main, *main.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class BenchEnv:
    """One run's private services; on exit every one of them is removed."""

    def __enter__(self) -> BenchEnv:
        self._children: list[procs.Child] = []
        self._closers: list[Callable[[], object]] = []
        self._producer: Producer | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="avocado-bench-"))
        with contextlib.ExitStack() as stack:
            if os.environ.get("BENCH_KEEP_TMP") != "1":
                stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
            self.broker_url = stack.enter_context(procs.private_vhost(RABBIT_HOST, "avocado-bench"))
            self.vhost = self.broker_url.rsplit("/", 1)[1]
            self.key_prefix = f"{self.vhost}:"
            stack.callback(self.purge_results)
            self._stack = stack.pop_all()
        self.settings = self.make_settings()
        # As a deployment does (``avocado db upgrade`` before its workers start): a worker
        # that finds its schema current never loads Alembic.
        with ResultStore.from_settings(self.settings) as store:
            store.migrate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tidy()
        self._stack.close()

    def make_settings(self, **overrides: Any) -> Settings:
        """Producer settings of this run; no ``.env`` is read, nothing of the user's."""
        run: dict[str, Any] = {"broker_url": self.broker_url, "redis_url": REDIS_URL}
        run |= {"key_prefix": self.key_prefix, "sqlite_path": str(self.tmp / "results.sqlite3")}
        return Settings(_env_file=None, default_model=MODEL, **run, **overrides)

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.settings)
        return self._producer

    def closing(self, thing: Any) -> Any:
        """``thing``, closed when the scenario ends (``tidy``)."""
        self._closers.append(thing.close)
        return thing

    def _env(self, **extra: str) -> dict[str, str]:
        """A subprocess's environment: this run's broker, Redis, key prefix and model, ``extra``."""
        extra = {"AVOCADO_DEFAULT_MODEL": MODEL, **extra}
        return procs.service_env(self.broker_url, REDIS_URL, self.key_prefix, **extra)

    def started(self, child: _C) -> _C:
        """``child``, stopped when the scenario ends (``tidy``)."""
        self._children.append(child)
        return child

    def start_sim(
        self, parallel: int = 4, models: tuple[str, ...] = (MODEL,), **pace: float
    ) -> procs.Server:
        """A simulator with ``parallel`` slots holding ``models``; ``pace``: ``latency_ms=2`` is
        ``--latency-ms 2``."""
        args = ["--parallel", str(parallel), "--max-queue", "1024", "--models", ",".join(models)]
        args += [a for k, v in pace.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        log = self.tmp / f"sim-{uuid.uuid4().hex[:6]}.log"
        return self.started(procs.start_simulator(*args, log=log, cwd=self.tmp))

    def start_embedded(self, n_ctx: int) -> procs.Server:
        """The embedded real model's server; its ``/v1`` URL once it lists models."""
        log = self.tmp / "embedded.log"
        return self.started(procs.start_embedded_llm(log, n_ctx, cwd=self.tmp))

    def start_gateway(self, **variables: str) -> tuple[procs.Server, str]:
        """``avocado-infer`` on this run's vhost, once ready, and a secret for it: keys required;
        ``variables`` add to its environment."""
        port = str(procs.free_port())
        env = self._env(AVOCADO_INFER_PORT=port, AVOCADO_INFER_LOG_LEVEL="warning", **variables)
        log, args = self.tmp / f"gateway-{port}.log", [str(procs.VENV_BIN / "avocado-infer")]
        process = procs.spawn(args, log, env=env, cwd=self.tmp)
        server = self.started(procs.Server(process, log, f"http://127.0.0.1:{port}"))

        def ready() -> bool:
            server.check_running("avocado-infer")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
            return False

        procs.wait_for(ready, 60, "the gateway to be ready")
        with KeyStore(self.redis(), self.key_prefix) as keys:
            return server, keys.create(f"bench-{port}")[1]

    def start_worker(
        self,
        pool: str,
        concurrency: int | None,
        ollama_url: str = "http://127.0.0.1:9",
        wait: bool = True,
        variables: dict[str, str] | None = None,
        **options: Any,
    ) -> procs.WorkerProcess:
        """``celery -A APP worker`` (``options``: ``app``, ``queues``); the fleet's app reads the
        pool from ``AVOCADO_WORKER_POOL``."""
        defaults = {
            "AVOCADO_SQLITE_PATH": str(self.tmp / "results.sqlite3"),
            "AVOCADO_OLLAMA_URL": ollama_url,
            "AVOCADO_WORKER_POOL": pool,
            # Each worker serves its Prometheus metrics, as deployed, on a port of its own.
            "AVOCADO_METRICS_PORT": str(procs.free_port()),
            "XDG_DATA_HOME": str(self.tmp),
            "TMPDIR": str(self.tmp),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.getenv("PYTHONPATH")) if p),
        }
        env = self._env(**(defaults | (variables or {})))
        options |= {"pool": pool, "concurrency": concurrency, "gossip": True, "prefix": "bench"}
        worker = procs.start_worker(env, self.tmp, **options)
        self.started(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, *workers: procs.WorkerProcess) -> None:
        for worker in workers:
            procs.wait_ready(worker, self.producer.app, timeout=90)

    def control(self, worker: procs.WorkerProcess, command: str, **arguments: Any) -> None:
        """A remote-control command (``add_consumer``, ``cancel_consumer``), answered."""
        app = self.producer.app
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, OperationalError), app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
                options = {"destination": [worker.name], "reply": True, "timeout": 5}
                if app.control.broadcast(command, arguments=arguments, connection=conn, **options):
                    return
            time.sleep(1)
        raise RuntimeError(f"{worker.name} did not answer {command}")

    @contextlib.contextmanager
    def consuming(self, worker: procs.WorkerProcess) -> Iterator[None]:
        """``worker`` consumes the fleet's job queue while the block runs, and not after."""
        self.control(worker, "add_consumer", queue=JOB_QUEUE)
        yield
        self.control(worker, "cancel_consumer", queue=JOB_QUEUE)

    def stop(self, *children: procs.Child) -> None:
        for child in children:
            child.stop()
            self._children.remove(child)

    def tidy(self) -> None:
        """After a scenario: stop and close what it made, drop the producer (idle, it times out)."""
        for child in reversed(self._children):
            with contextlib.suppress(Exception):
                child.stop()
        self._children.clear()
        self._closers += [self._producer.close] if self._producer else []
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()
        self._producer = None
        kombu_pools.reset()

    def reset(self) -> None:
        """After a failed scenario: tidy up, empty the queues and this run's Redis keys."""
        self.tidy()
        with contextlib.suppress(Exception), self.producer.app.connection_for_write() as conn:
            for queue in (JOB_QUEUE, "bench.noop"):
                with contextlib.suppress(Exception):
                    conn.default_channel.queue_purge(queue)
        with contextlib.suppress(Exception):
            self.purge_results()

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those delivered and unacked)."""
        with self.producer.app.connection_for_read() as connection:
            _, messages, _ = connection.default_channel.queue_declare(queue, passive=True)
            return int(messages)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(REDIS_URL)

    def purge_results(self) -> None:
        """Delete every Redis key of this run (results, locks) but the models its producer
        marked wanted, which it marks again only a minute later."""
        wanted = f"{self.key_prefix}{WANTED_MODELS}".encode()
        with contextlib.closing(self.redis()) as client:
            keys = [
                key
                for key in client.scan_iter(match=f"{self.key_prefix}*", count=2000)
                if key != wanted
            ]
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])
