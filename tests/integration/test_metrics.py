"""Worker metrics on ``/metrics``: jobs by state, retries by reason, queue wait, generation
time, token counts and rates, summed over the pool's processes by the main process."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from avocado_shared import GenerateResult, JobFailed, Producer
from avocado_shared.producer import SENT_AT_HEADER
from avocado_sim import OllamaSimulator
from ollama_worker.metrics import MetricsExporter, MetricsUnavailable, queue_wait, retry_reason
from ollama_worker.ollama import OllamaUnavailable
from tests.conftest import WorkerFactory
from tests.services import WorkerProcess, free_port, wait_for

WAIT = 60
MODEL = "llama3.2:1b"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _endpoint(worker: WorkerProcess) -> tuple[str, Path | None]:
    """The URL and multiprocess directory (None: one process) the worker logs once it
    serves metrics."""
    found = wait_for(
        lambda: re.search(
            r"metrics on (\S+) \((?:multiprocess dir (\S+)|one process)\)", worker.log_text()
        ),
        timeout=30,
        what=f"{worker.name} to serve metrics",
    )
    return found.group(1), Path(found.group(2)) if found.group(2) else None


def _scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _pids(directory: Path) -> set[int]:
    """Processes that wrote counters: prometheus_client names each file after its pid."""
    return {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("counter_*.db")}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_metrics_count_each_outcome_and_sum_over_the_pool(
    producer: Producer,
    fresh_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    pool: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    # prometheus_client's multiprocess mode, set as its documentation asks: before the start.
    multiproc = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)} if pool == "prefork" else {}
    worker = worker_factory.process(
        fresh_sim.url,
        concurrency=2,
        AVOCADO_METRICS_PORT=str(port),
        AVOCADO_WORKER_POOL=pool,
        **multiproc,
    )
    url, directory = _endpoint(worker)
    assert url == f"http://127.0.0.1:{port}/metrics"

    results: list[GenerateResult] = []
    try:
        # Two at once, each slow enough to keep its pool process busy: two processes count.
        fresh_sim.config.latency_ms = 500
        handles = [producer.generate(f"Count to {n}.") for n in (3, 4)]
        results += [handle.get(timeout=WAIT) for handle in handles]
        fresh_sim.config.latency_ms = 0
        fresh_sim.config.fail_first = 1  # one 503, then the retry succeeds
        results.append(producer.generate("Try again.").get(timeout=WAIT))
        fresh_sim.config.fail_status, fresh_sim.config.fail_first = 400, 1
        with pytest.raises(JobFailed, match="ollama refused the request"):
            producer.generate("Rejected.").get(timeout=WAIT)
    finally:
        fresh_sim.config.latency_ms = 0
        fresh_sim.config.fail_status, fresh_sim.config.fail_first = 503, 0

    generate = {"kind": "generate"}
    by_model = {**generate, "model": MODEL}

    def settled() -> Samples | None:
        # The result reaches the client before the signals that count it fire.
        samples = _scrape(url)
        done = _value(samples, "avocado_jobs_total", **generate, state="succeeded") == 3
        return (
            samples
            if done and _value(samples, "avocado_jobs_total", **generate, state="failed") == 1
            else None
        )

    samples = wait_for(settled, timeout=WAIT, what="the four jobs to be counted")

    jobs = {
        state: _value(samples, "avocado_jobs_total", **generate, state=state)
        for state in ("succeeded", "failed", "retried")
    }
    assert jobs == {"succeeded": 3, "failed": 1, "retried": 1}
    assert _value(samples, "avocado_jobs_total", kind="summarize", state="succeeded") == 0
    assert _value(samples, "avocado_job_retries_total", **generate, reason="OllamaUnavailable") == 1
    # Every run waits: two, the 503 and its retry, the 400. The retry's one-second countdown
    # is not waiting: it is measured from its due time.
    assert _value(samples, "avocado_job_queue_wait_seconds_count", **generate) == 5
    assert _value(samples, "avocado_job_queue_wait_seconds_bucket", **generate, le="1.0") == 5

    assert _value(samples, "avocado_generation_seconds_count", **by_model) == 3
    assert _value(samples, "avocado_generation_seconds_sum", **by_model) == pytest.approx(
        sum(r.total_duration_ms for r in results) / 1000
    )
    assert _value(samples, "avocado_generation_tokens_per_second_count", **by_model) == 3
    rates = sum(r.completion_tokens / (r.eval_duration_ms / 1000) for r in results)
    assert rates > 0
    assert _value(samples, "avocado_generation_tokens_per_second_sum", **by_model) == pytest.approx(
        rates
    )
    assert _value(samples, "avocado_prompt_tokens_total", **by_model) == sum(
        r.prompt_tokens for r in results
    )
    assert _value(samples, "avocado_completion_tokens_total", **by_model) == sum(
        r.completion_tokens for r in results
    )
    if pool == "prefork":
        assert directory == tmp_path, "prefork: prometheus_client's multiprocess mode"
        assert len(_pids(directory) - {worker.process.pid}) >= 2, "two pool processes counted"
    else:
        assert directory is None, "threads: every job counts in the one process"
    assert worker.stop() == 0


def test_a_second_worker_on_a_taken_port_serves_jobs_without_metrics(
    producer: Producer, fresh_sim: OllamaSimulator, worker_factory: WorkerFactory
) -> None:
    port = free_port()
    first = worker_factory.process(fresh_sim.url, AVOCADO_METRICS_PORT=str(port))
    url, _ = _endpoint(first)
    second = worker_factory.process(fresh_sim.url, AVOCADO_METRICS_PORT=str(port))
    wait_for(
        lambda: f"metrics disabled: cannot listen on 127.0.0.1:{port}" in second.log_text(),
        timeout=30,
        what="the second worker to warn that the port is taken",
    )
    assert "metrics on" not in second.log_text()

    assert first.stop() == 0
    result = producer.generate("Anyone there?").get(timeout=WAIT)

    assert result.worker == second.name
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


def test_queue_wait_counts_from_the_later_of_publish_and_due_time() -> None:
    now = time.time()
    sent_long_ago = {SENT_AT_HEADER: now - 30}
    due = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 2))

    assert 30 <= (queue_wait(SimpleNamespace(headers=sent_long_ago, eta=None)) or 0) < 31
    assert 1 <= (queue_wait(SimpleNamespace(headers=sent_long_ago, eta=due)) or 0) < 4
    assert queue_wait(SimpleNamespace(headers={}, eta=None)) is None


def test_retry_reason_is_the_class_of_the_error_behind_the_retry() -> None:
    from celery.exceptions import Retry

    assert retry_reason(Retry(exc=OllamaUnavailable("busy"))) == "OllamaUnavailable"
    assert retry_reason(None) == "BrokerConnectionLost"


def test_prefork_without_a_multiprocess_directory_refuses_metrics_and_says_how(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(MetricsUnavailable, match="PROMETHEUS_MULTIPROC_DIR set to an empty"):
        MetricsExporter("127.0.0.1", free_port(), multiprocess=True)
