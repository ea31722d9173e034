"""The KEDA example scales a model's workers on that model's lane queues, read over HTTP, and
is valid against KEDA's own CRD schemas (unknown fields refused, as kubectl's strict field
validation does)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from avocado_shared.routing import Lane, lane_queue_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docker" / "keda" / "worker-scaledobject.yaml"
SCHEMAS = {
    "ScaledObject": ROOT / "tests" / "data" / "keda-scaledobject.schema.json",
    "TriggerAuthentication": ROOT / "tests" / "data" / "keda-triggerauthentication.schema.json",
}


def _strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused wherever it lists an object's fields."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_the_example_is_valid_against_kedas_schema(kind: str) -> None:
    schema = _strict(json.loads(SCHEMAS[kind].read_text()))
    (document,) = [doc for doc in _documents() if doc["kind"] == kind]
    jsonschema.validate(document, schema)
    assert document["apiVersion"] == "keda.sh/v1alpha1"


def test_a_typo_in_the_example_would_be_refused() -> None:
    schema = _strict(json.loads(SCHEMAS["ScaledObject"].read_text()))
    (document,) = [doc for doc in _documents() if doc["kind"] == "ScaledObject"]
    broken = copy.deepcopy(document)
    broken["spec"]["maxReplicas"] = broken["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(broken, schema)


def test_it_counts_both_lanes_of_its_model_over_http() -> None:
    (scaled,) = [doc for doc in _documents() if doc["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["protocol"] == "http", "AMQP counts ready messages only: scales down mid-job"
    assert "excludeUnacknowledged" not in meta
    assert (meta["mode"], meta["useRegex"], meta["operation"]) == ("QueueLength", "true", "sum")
    pattern = re.compile(meta["queueName"])
    model = "llama3.2:1b"
    lanes = [lane_queue_name(model, lane) for lane in Lane]
    assert all(pattern.fullmatch(name) for name in lanes)
    others = [lane_queue_name("llama3.2:3b", Lane.BATCH), "ml.generate", f"{lanes[0]}.migrating"]
    assert not any(pattern.fullmatch(name) for name in others)
    auth = next(doc for doc in _documents() if doc["kind"] == "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert "host" not in meta, "the management URL and its password come from a Secret"
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "host"
