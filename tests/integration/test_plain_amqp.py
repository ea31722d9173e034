"""A job published by a plain AMQP client, exactly as docs/topology.md shows, is run and stored."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from avocado_shared import JobStatus, Producer
from avocado_sim import OllamaSimulator
from tests.services import WorkerProcess, service_env

PAGE = Path(__file__).resolve().parents[2] / "docs" / "topology.md"


def _page_example() -> str:
    """The Python block that follows the ``plain-amqp-example`` marker in docs/topology.md."""
    found = re.search(r"<!-- plain-amqp-example -->\n```python\n(.*?)```", PAGE.read_text(), re.S)
    assert found, "docs/topology.md lost its plain AMQP example"
    return found.group(1)


@pytest.mark.both_brokers
def test_job_from_a_plain_amqp_client_runs_and_is_stored(
    broker_url: str,
    key_prefix: str,
    producer: Producer,
    fresh_sim: OllamaSimulator,
    worker: WorkerProcess,
) -> None:
    code = _page_example()
    assert "celery" not in code.lower()

    done = subprocess.run(
        [sys.executable, "-c", code],
        env=service_env(broker_url, key_prefix),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    result = producer.handle(job_id).get(timeout=60)
    assert result.job_id == job_id
    assert result.completion_tokens == 64
    row = producer.results.get(job_id)
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.worker == worker.name
