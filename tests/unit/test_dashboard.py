"""The Grafana dashboard (docker/grafana/) asks only for metrics the code exports, and shows
each of them: every PromQL expression of its panels and variables is parsed (promql-parser),
its metric names compared with the series the worker's and the gateway's registries make.
Its datasource is the one Grafana is provisioned with."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry

from avocado_infer.metrics import GatewayMetrics
from ollama_worker.metrics import JobMetrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker/grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

# The series a metric family of each type is exposed as (prometheus_client's text format).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}
# Grafana's own variables, replaced by what Grafana would put there before Prometheus parses.
_VARIABLES = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{?(\w+)\}?")


def _families(registry: CollectorRegistry) -> dict[str, str]:
    return {family.name: family.type for family in registry.collect()}


def _exported() -> dict[str, str]:
    """Every metric family the fleet exports, by name: the worker's jobs and the gateway's
    requests, streams and fleet gauges (read from no model: the families stand empty)."""
    worker = CollectorRegistry()
    JobMetrics(worker)
    gateway = GatewayMetrics()
    gateway.watch(list)
    return {**_families(worker), **_families(gateway.registry)}


def _series(families: dict[str, str]) -> set[str]:
    return {name + suffix for name, kind in families.items() for suffix in _SUFFIXES[kind]}


def _concrete(expr: str) -> str:
    """``expr`` as Grafana sends it: ranges 5m, a variable a regex that matches all."""
    return _VARIABLES.sub(lambda m: "5m" if m[1] else ".*", expr)


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            labels = re.fullmatch(r"label_values\((.+),\s*\w+\)", text)
            yield f"variable {variable['name']!r}", labels[1] if labels else text


def _metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(_concrete(expr)), visit)
    return names


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def test_there_is_a_dashboard() -> None:
    assert [path.name for path in DASHBOARDS] == ["avocado-fleet.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_only_metrics_the_code_exports(path: Path) -> None:
    exported = _series(_exported())
    queries = list(_queries(_load(path)))

    assert len(queries) > 10
    for where, expr in queries:
        used = _metric_names(expr)
        assert used, f"{where}: no metric in {expr!r}"
        assert used <= exported, f"{where}: {sorted(used - exported)} not exported"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_shows_every_metric_of_the_fleet(path: Path) -> None:
    """Each family the fleet exports of its own (not the process collector's) is on a panel."""
    ours = {name: kind for name, kind in _exported().items() if name.startswith("avocado_")}
    used = set().union(*(_metric_names(expr) for _, expr in _queries(_load(path))))

    shown = {name for name, kind in ours.items() if used & _series({name: kind})}
    assert shown == set(ours), sorted(set(ours) - shown)


def test_the_parser_finds_the_names_a_query_uses_and_nothing_else() -> None:
    """The check above can fail: names in selectors, ranges and histogram_quantile are found,
    labels, functions and Grafana's variables are not taken for metrics."""
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(avocado_x_bucket{model=~"$model"}'
        "[$__rate_interval]))) / on() group_left sum(avocado_y_total)"
    )

    assert _metric_names(expr) == {"avocado_x_bucket", "avocado_y_total"}
    assert _series({"avocado_jobs": "counter"}) == {"avocado_jobs_total", "avocado_jobs_created"}
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        promql_parser.parse("sum by (model (rate(x[5m]))")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_read_the_provisioned_datasource(path: Path) -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uids = {source["uid"] for source in sources["datasources"]}
    dashboard = _load(path)

    used = {panel["datasource"]["uid"] for panel in dashboard["panels"] if panel["type"] != "row"}
    assert used == uids
    assert dashboard["uid"] == "spicy-avocado-fleet"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/avocado.yml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == ["/var/lib/grafana/dashboards"]
