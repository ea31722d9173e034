"""Importing a module connects to nothing: every module of the four packages, imported in a fresh
interpreter whose sockets refuse to connect, with no broker, Redis or database reachable."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import importlib, json, pkgutil, socket
tried = []
def refuse(*args, **kwargs):
    tried.append(repr(args[1:] or args))
    raise OSError("this test allows no connection")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import avocado_infer, avocado_shared, avocado_sim, ollama_worker
names = [
    info.name
    for package in (avocado_shared, avocado_sim, ollama_worker, avocado_infer)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "tried": tried}))
"""


def test_importing_every_module_makes_no_network_call() -> None:
    unreachable = {
        "AVOCADO_BROKER_URL": "amqp://guest:guest@127.0.0.1:9//",
        "AVOCADO_REDIS_URL": "redis://127.0.0.1:9/0",
        "AVOCADO_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=unreachable, capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) > 40
    assert "ollama_worker.tasks" in report["modules"]
    assert "avocado_infer.app" in report["modules"]
    assert "avocado_sim.simulator" in report["modules"]
    assert report["tried"] == []
