"""The scaling signal: the gateway's /metrics gives the backlog per model and lane, and the
nodes and slots that take each model's jobs, read at each scrape."""

from __future__ import annotations

from datetime import datetime, timezone

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from avocado_infer.gateway import ServedModel
from avocado_infer.metrics import GatewayMetrics
from avocado_shared.fleet import WorkerRecord

NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)
FLEET = ("avocado_backlog_jobs", "avocado_model_nodes", "avocado_model_slots")


def _samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[str, ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name in FLEET
        for sample in family.samples
    }


def test_backlog_nodes_and_slots_per_model() -> None:
    a = WorkerRecord(worker="a@gpu", models=["m:1b", "q:0.5b"], slots=4, updated_at=NOW)
    b = a.model_copy(update={"worker": "b@gpu", "slots": 2, "models": ["m:1b"]})
    draining = b.model_copy(update={"worker": "c@gpu", "draining": True})
    served = [
        ServedModel("m:1b", NOW, NOW, (a, b, draining), (), {"interactive": 3, "batch": 40}),
        ServedModel("q:0.5b", NOW, NOW, (a,), (), {"interactive": 0, "batch": None}),
    ]
    metrics = GatewayMetrics()
    metrics.watch(lambda: served)
    got = _samples(metrics)
    assert got[("avocado_backlog_jobs", ("interactive", "m:1b"))] == 3
    assert got[("avocado_backlog_jobs", ("batch", "m:1b"))] == 40
    assert got[("avocado_backlog_jobs", ("interactive", "q:0.5b"))] == 0
    assert ("avocado_backlog_jobs", ("batch", "q:0.5b")) not in got  # unknown: not made up
    assert got[("avocado_model_nodes", ("m:1b",))] == 2
    assert got[("avocado_model_slots", ("m:1b",))] == 6
    assert got[("avocado_model_slots", ("q:0.5b",))] == 4


def test_a_fleet_that_cannot_be_read_leaves_the_other_metrics_served() -> None:
    def unreadable() -> list[ServedModel]:
        raise ConnectionError("Redis is down")

    metrics = GatewayMetrics()
    metrics.watch(unreadable)
    text = generate_latest(metrics.registry).decode()
    assert "avocado_infer_requests" in text
    assert "avocado_backlog_jobs" not in text
