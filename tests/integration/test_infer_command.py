"""``avocado-infer``, the console script, as a user starts it: its settings from the
environment (``AVOCADO_INFER_*`` and the fleet's ``AVOCADO_*``), ready on the port they name,
a clean shutdown on SIGTERM, and traces when ``OTEL_*`` asks for them."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import redis

from avocado_shared.fleet import WorkerRecord, WorkerRegistry
from tests.processes import VENV_BIN, Child, spawn, wait_for
from tests.services import REDIS_URL, free_port, service_env


def test_avocado_infer_serves_on_the_port_its_settings_name(
    broker_url: str, key_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    # A key prefix of its own: a node another test left behind (SIGKILLed, its record alive
    # until its TTL) lists no model here.
    key_prefix = f"{key_prefix}command-"
    env = service_env(
        broker_url,
        key_prefix,
        AVOCADO_INFER_HOST="127.0.0.1",
        AVOCADO_INFER_PORT=str(port),
        AVOCADO_INFER_REQUIRE_KEYS="false",
        OTEL_TRACES_EXPORTER="console",  # traces on: each request's span printed at exit
    )
    # A worker's record under the key prefix of the environment: /api/tags lists its model.
    registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), key_prefix)
    registry.put(WorkerRecord(worker="command-test@node", models=["tiny-test:1b"]))
    log = tmp_path / "infer.log"
    # Run from an empty directory: no .env of the checkout's is read.
    child = Child(spawn([str(VENV_BIN / "avocado-infer")], log, env=env, cwd=tmp_path), log)
    url = f"http://127.0.0.1:{port}"

    def ready() -> httpx.Response | None:
        child.check_running("avocado-infer")
        try:
            return httpx.get(f"{url}/readyz", timeout=10)
        except httpx.TransportError:
            return None

    try:
        answer = wait_for(ready, 60, "avocado-infer to answer")
        tags = httpx.get(f"{url}/api/tags", timeout=10).json()
    finally:
        code = child.stop()
        registry.remove("command-test@node")
        registry.close()

    assert answer.status_code == 200, answer.text
    assert [m["name"] for m in tags["models"]] == ["tiny-test:1b"]
    # Shut down (the lifespan closed its clients), then uvicorn re-raises the signal it took.
    assert "Application shutdown complete" in child.log_text()
    assert code == -signal.SIGTERM, child.log_text()
    spans = child.log_text()
    assert '"name": "GET /api/tags"' in spans
    assert '"service.name": "avocado-infer"' in spans
    assert '"name": "GET /readyz"' not in spans  # health checks are not traced
