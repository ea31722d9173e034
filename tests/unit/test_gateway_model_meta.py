"""What the gateway says of one model, on a fake gateway (``tests/fake_gateway.py``): Ollama's
``POST /api/show`` and OpenAI's ``GET /v1/models/{id}``, from what the nodes' servers said of
it (``ModelMeta`` in their fleet records), read back by the official clients' own response
models; 404 in each API's shape for a model no node serves. Through the real queue:
tests/integration/test_infer_model_meta.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import openai
import pytest
from ollama._types import ShowResponse
from openai.types import Model

from avocado_infer.gateway import ServedModel
from avocado_shared.fleet import ModelMeta, WorkerRecord
from tests.fake_gateway import MODEL, Served

Serve = Callable[..., Served]

SEEN = datetime(2025, 1, 2, 3, 5, 0, tzinfo=timezone.utc)
MODIFIED = datetime(2024, 12, 1, 8, 0, 0, tzinfo=timezone.utc)
NODE = WorkerRecord(worker="a@gpu", models=[MODEL], loaded=[MODEL], updated_at=SEEN)
META = ModelMeta(
    format="gguf",
    family="llama",
    families=["llama"],
    parameter_size="1.2B",
    quantization_level="Q4_K_M",
    architecture="llama",
    parameter_count=1_235_814_432,
    context_length=8192,
    embedding_length=2048,
    capabilities=["completion", "tools"],
    modified_at=MODIFIED,
)
DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "1.2B",
    "quantization_level": "Q4_K_M",
}


def _served(name: str, meta: ModelMeta | None, shown: str | None = None) -> ServedModel:
    node = NODE.model_copy(update={"models": [name], "loaded": [name]})
    backlog = {"interactive": 0, "batch": 0}
    return ServedModel(name, SEEN, node.expires_at, (node,), (node.worker,), backlog, shown, meta)


def _app(served: Serve, *models: ServedModel) -> Served:
    app = served()
    app.fake.served = list(models)
    return app


@pytest.mark.parametrize("field", ["model", "name"])  # ``name``: Ollama's older clients
def test_show_is_ollamas_shape_from_what_the_nodes_said(served: Serve, field: str) -> None:
    app = _app(served, _served(MODEL, META))

    answer = app.client.post("/api/show", json={field: MODEL})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body.pop("avocado")["nodes"][0]["worker"] == "a@gpu"
    assert body == {
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": DETAILS,
        "model_info": {
            "general.architecture": "llama",
            "general.parameter_count": 1_235_814_432,
            "llama.context_length": 8192,
            "llama.embedding_length": 2048,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": MODIFIED.isoformat(),
    }
    shown = ShowResponse.model_validate(body)  # as ``ollama.Client.show`` reads it
    assert shown.details is not None
    assert shown.details.parameter_size == "1.2B"
    assert shown.modelinfo == body["model_info"]
    assert shown.modified_at == MODIFIED


@pytest.mark.parametrize(
    ("meta", "capabilities", "info"),
    [
        # A node that described nothing yet (or an older worker): the fleet completes with it.
        (None, ["completion"], {}),
        # An OpenAI-compatible server names no architecture.
        (
            ModelMeta(context_length=4096, capabilities=["completion", "vision"]),
            ["completion", "vision"],
            {"general.context_length": 4096},
        ),
        (ModelMeta(), ["completion"], {}),
    ],
)
def test_show_says_what_is_known_and_no_more(
    served: Serve, meta: ModelMeta | None, capabilities: list[str], info: dict[str, Any]
) -> None:
    app = _app(served, _served("smollm2:latest", meta, shown="smollm2"))

    body = app.client.post("/api/show", json={"model": "smollm2"}).json()

    assert body["capabilities"] == capabilities
    assert body["model_info"] == info
    assert body["modified_at"] == SEEN.isoformat()  # when a node last vouched for it
    assert ShowResponse.model_validate(body).capabilities == capabilities


def test_tags_give_each_models_details(served: Serve) -> None:
    app = _app(served, _served(MODEL, META), _served("qwen3:0.6b", None))

    listing = app.client.get("/api/tags").json()["models"]

    assert [m["details"] for m in listing] == [DETAILS, {}]


@pytest.mark.parametrize(
    "body", [{"model": "qwen3:8b"}, {"model": "llama3.2"}, {}, {"model": 5}, "not an object"]
)
def test_show_of_a_model_no_node_serves_is_a_404_and_bad_input_a_400(
    served: Serve, body: Any
) -> None:
    app = _app(served, _served(MODEL, META))

    answer = app.client.post("/api/show", json=body)

    assert list(answer.json()) == ["error"]
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        assert answer.status_code == 404
        assert answer.json()["error"].startswith(f"model {body['model']!r} not found")
    else:
        assert answer.status_code == 400


@pytest.mark.parametrize("name", [MODEL, "hf.co/org/model-gguf:Q4_K_M"])
def test_models_retrieve_is_openais_model_object(served: Serve, name: str) -> None:
    app = _app(served, _served(name, META))
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=app.client)

    got = sdk.models.retrieve(name)
    raw = app.client.get(f"/v1/models/{name}").json()

    assert isinstance(got, Model)
    assert (got.id, got.object, got.created, got.owned_by) == (
        name,
        "model",
        int(SEEN.timestamp()),
        "avocado",
    )
    assert raw["max_model_len"] == 8192  # vLLM's field: the context its nodes run it with
    assert raw == app.client.get("/v1/models").json()["data"][0]


def test_models_retrieve_of_a_model_no_node_serves_is_openais_404(served: Serve) -> None:
    app = _app(served, _served(MODEL, None))
    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key="-", http_client=app.client, max_retries=0
    )

    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("gpt-4o")
    answer = app.client.get("/v1/models/gpt-4o")

    assert missing.value.code == "model_not_found"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "max_model_len" not in app.client.get(f"/v1/models/{MODEL}").json()
