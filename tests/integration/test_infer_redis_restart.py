"""An answer through the gateway rides out Redis: Redis is SIGKILLed in the middle of a
streamed answer and comes back from its append-only file a moment later. The worker's stream
writes fail and it goes on; the gateway waits for Redis, then finishes the answer from the
stored result: the client sees a pause, never an error, and reads exactly what was stored."""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from avocado_infer import InferSettings
from avocado_shared import JobStatus, Producer, Settings
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.services import RedisServer

MODEL = "llama3.2:1b"
WAIT = 90
BEFORE_KILL = 5  # chunks the client reads before Redis dies


@pytest.fixture
def slow() -> Iterator[OllamaSimulator]:
    """60 tokens at 10 a second: the answer outlasts Redis' death and return."""
    with OllamaSimulator(SimConfig(models=[MODEL], default_tokens=60, tokens_per_s=10)) as sim:
        yield sim


def _lines(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


def test_a_streamed_answer_rides_out_a_redis_restart(
    broker_url: str,
    key_prefix: str,
    slow: OllamaSimulator,
    worker_factory: WorkerFactory,
    tmp_path: Path,
) -> None:
    database = tmp_path / "results.sqlite3"
    with RedisServer(tmp_path) as redis_server:
        fleet = Settings(
            broker_url=broker_url,
            redis_url=redis_server.url,
            key_prefix=key_prefix,
            sqlite_path=str(database),
        )
        worker = worker_factory(
            slow.url, AVOCADO_REDIS_URL=redis_server.url, AVOCADO_SQLITE_PATH=str(database)
        )
        gateway = InProcessGateway(InferSettings(fleet=fleet, require_keys=False)).start()
        chunks: list[dict[str, Any]] = []
        try:
            prompt = f"Tell me about avocados ({uuid.uuid4().hex[:6]})."
            body = {"model": MODEL, "prompt": prompt}
            with (
                httpx.Client(base_url=gateway.url, timeout=WAIT) as http,
                http.stream("POST", "/api/generate", json=body) as response,
            ):
                assert response.status_code == 200
                job_id = response.headers["x-avocado-job-id"]
                for chunk in _lines(response):
                    chunks.append(chunk)
                    if len(chunks) == BEFORE_KILL:
                        redis_server.down_until(
                            lambda: "not written, the job goes on" in worker.log_text(),
                            "the worker to go on without its stream",
                            kill=True,
                            timeout=WAIT,
                        )
        finally:
            gateway.stop()
        with Producer(fleet) as producer:
            row = producer.results.get(job_id)
        gc.collect()  # the gateway's job handles unsubscribe while their Redis answers

    *pieces, final = chunks
    assert len(pieces) > BEFORE_KILL, final
    assert all("error" not in c for c in chunks), chunks[-1]
    assert final["done"] is True
    text = "".join(c["response"] for c in chunks)
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.attempts == 1
    assert row.result is not None
    assert text == row.result["text"]  # the client read exactly what was stored
    assert final["eval_count"] == row.completion_tokens == 60
    assert slow.generation_calls == 1
