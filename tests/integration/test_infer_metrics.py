"""avocado-infer's Prometheus metrics: a streamed answer through the real queue moves the
request counter, the time to first token, the queue wait and the tokens per second, and is
counted as an active stream while it is sent; read with prometheus_client's own parser."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.services import wait_for

WAIT = 60
MODEL = "llama3.2:1b"
ROUTE = {"route": "/api/generate"}
POSTED = {"method": "POST", "status": "200", **ROUTE}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(gateway: InProcessGateway) -> Samples:
    """Every sample of the gateway's /metrics, by name and labels."""
    answer = httpx.get(f"{gateway.url}/metrics", timeout=WAIT)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_streamed_answer_moves_the_gateways_metrics(
    gateway_factory: Callable[..., InProcessGateway], worker_factory: WorkerFactory
) -> None:
    gateway, other = gateway_factory(), gateway_factory()  # a registry each, no clash
    body = {"model": MODEL, "prompt": "Count to forty.", "options": {"num_predict": 40}}
    with OllamaSimulator(SimConfig(models=[MODEL], tokens_per_s=20)) as sim:
        worker_factory(sim.url)
        with httpx.stream("POST", f"{gateway.url}/api/generate", json=body, timeout=WAIT) as answer:
            lines = answer.iter_lines()
            first = json.loads(next(lines))
            during = _scrape(gateway)  # the answer takes two seconds: it is being sent
            *_, last = (json.loads(line) for line in lines)

    assert first["done"] is False
    assert last["done"] is True
    assert _value(during, "avocado_infer_active_streams") == 1
    assert _value(during, "avocado_infer_time_to_first_token_seconds_count", **ROUTE) == 1

    # The request is counted once its response ended, which the client may see first.
    after = wait_for(
        lambda: (
            (s := _scrape(gateway)) and _value(s, "avocado_infer_requests_total", **POSTED) and s
        ),
        timeout=WAIT,
        what="the request to be counted",
    )
    assert _value(after, "avocado_infer_requests_total", **POSTED) == 1
    assert _value(after, "avocado_infer_active_streams") == 0
    assert _value(after, "avocado_infer_time_to_first_token_seconds_count", **ROUTE) == 1
    assert _value(after, "avocado_infer_time_to_first_token_seconds_sum", **ROUTE) > 0
    assert _value(after, "avocado_infer_queue_wait_seconds_count") == 1
    assert _value(after, "avocado_infer_tokens_per_second_count", model=MODEL) == 1
    # The simulator's own figures: 40 tokens at 20 a second.
    rate = last["eval_count"] / (last["eval_duration"] / 1e9)
    assert _value(after, "avocado_infer_tokens_per_second_sum", model=MODEL) == pytest.approx(rate)
    scrapes = {"method": "GET", "status": "200", "route": "/metrics"}
    assert _value(after, "avocado_infer_requests_total", **scrapes) >= 1  # the one during

    untouched = _scrape(other)
    assert _value(untouched, "avocado_infer_requests_total", **POSTED) == 0
    assert _value(untouched, "avocado_infer_queue_wait_seconds_count") == 0
