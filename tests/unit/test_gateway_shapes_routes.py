"""What the gateway's other routes answer, on a fake gateway (``tests/fake_gateway.py``):
unknown routes and methods in each API's error shape, the models and nodes of ``/api/tags``,
``/api/ps`` and ``/v1/models``, ``/api/version``, the ``/jobs`` routes and the health routes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from importlib.metadata import version

import pytest

from avocado_infer.errors import RegistryUnavailable
from avocado_infer.gateway import ServedModel
from avocado_infer.job_state import JobState, JobView, unknown_job
from avocado_shared.contracts import JobKind
from avocado_shared.fleet import WorkerRecord
from tests.fake_gateway import MODEL, Served

Serve = Callable[..., Served]

NOT_FOUND = {
    "error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}
}
EARLY = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
LATE = datetime(2025, 1, 2, 3, 5, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("method", "path", "status", "answer"),
    [
        ("GET", "/api/nope", 404, {"error": "Not Found"}),
        ("POST", "/api/nope", 404, {"error": "Not Found"}),
        ("GET", "/nope", 404, {"error": "Not Found"}),
        ("GET", "/v1/nope", 404, NOT_FOUND),
        ("GET", "/api/generate", 405, {"error": "Method Not Allowed"}),
        (
            "GET",
            "/v1/chat/completions",
            405,
            {"error": NOT_FOUND["error"] | {"message": "Method Not Allowed"}},
        ),
    ],
)
def test_unknown_routes_and_methods_answer_in_the_apis_shape(
    served: Serve, method: str, path: str, status: int, answer: dict[str, object]
) -> None:
    response = served(require_keys=True).client.request(method, path)
    assert response.status_code == status
    assert response.json() == answer
    if status == 405:
        assert response.headers["allow"] == "POST"


def listed(name: str, **fields: object) -> dict[str, object]:
    """A model as Ollama lists it: sizes and digests are the nodes' own, not announced."""
    return {"name": name, "model": name, "size": 0, "digest": "", "details": {}, **fields}


def _node(worker: str, models: list[str], loaded: list[str], at: datetime) -> WorkerRecord:
    return WorkerRecord(
        worker=worker, models=models, loaded=loaded, slots=4, running=1, updated_at=at
    )


A = _node("a@gpu", [MODEL], [MODEL], EARLY)
B = _node("b@gpu", [MODEL, "qwen3:0.6b"], [], LATE).model_copy(
    update={"draining": True, "cutoff": datetime.now(timezone.utc) + timedelta(hours=2)}
)
SERVED = [
    ServedModel(MODEL, LATE, B.expires_at, (A, B), ("a@gpu",), {"interactive": 0, "batch": 7}),
    ServedModel("qwen3:0.6b", LATE, B.expires_at, (B,), (), {"interactive": 2, "batch": None}),
]


def test_tags_and_models_list_the_served_models_with_their_nodes_and_backlog(
    served: Serve,
) -> None:
    app = served()
    app.fake.served = SERVED
    tags = app.client.get("/api/tags")
    assert tags.status_code == 200
    listing = tags.json()["models"]
    assert [m["name"] for m in listing] == [MODEL, "qwen3:0.6b"]
    left = listing[1]["avocado"]["nodes"][0].pop("time_left_s")
    assert left == pytest.approx(B.time_left_s(), abs=5)
    assert listing[1] == listed("qwen3:0.6b", modified_at=LATE.isoformat()) | {
        "avocado": {
            "nodes": [
                {
                    "worker": "b@gpu",
                    "loaded": False,
                    "slots": 4,
                    "running": 1,
                    "draining": True,
                }
            ],
            "backlog": {"interactive": 2, "batch": None},
        }
    }
    assert listing[0]["avocado"]["backlog"] == {"interactive": 0, "batch": 7}
    assert [n["loaded"] for n in listing[0]["avocado"]["nodes"]] == [True, False]
    models = app.client.get("/v1/models").json()
    assert [(m["id"], m["created"], m["owned_by"]) for m in models["data"]] == [
        (MODEL, int(LATE.timestamp()), "avocado"),
        ("qwen3:0.6b", int(LATE.timestamp()), "avocado"),
    ]
    assert models["data"][1]["avocado"]["nodes"][0].pop("time_left_s") == pytest.approx(left, abs=5)
    assert models["data"][1]["avocado"] == listing[1]["avocado"]


def test_ps_lists_the_loaded_models_until_their_last_node_expires(served: Serve) -> None:
    app = served()
    app.fake.served = SERVED
    response = app.client.get("/api/ps")
    assert response.status_code == 200
    (only,) = response.json()["models"]
    view = SERVED[0].view()
    for node in (view, only["avocado"]):  # the draining node's time left, as it runs out
        assert node["nodes"][1].pop("time_left_s") == pytest.approx(B.time_left_s(), abs=5)
    assert only == listed(MODEL, expires_at=B.expires_at.isoformat(), size_vram=0) | {
        "avocado": view
    }


@pytest.mark.parametrize("path", ["/api/tags", "/api/ps"])
def test_an_unreadable_registry_is_a_503(served: Serve, path: str) -> None:
    app = served()
    app.fake.failing["models"] = RegistryUnavailable("Redis is down")
    response = app.client.get(path)
    assert (response.status_code, response.json()) == (503, {"error": "Redis is down"})


def test_version_is_the_gateways(served: Serve) -> None:
    response = served().client.get("/api/version")
    assert response.json() == {"version": version("avocado-infer")}


def test_a_jobs_state(served: Serve) -> None:
    app = served()
    app.fake.views["job-9"] = JobView(
        "job-9",
        JobState.STARTED,
        JobKind.GENERATE,
        worker="celery@gpu-1",
        attempts=2,
        updated_at=EARLY,
    )
    response = app.client.get("/jobs/job-9")
    assert response.status_code == 200
    assert response.json() == {
        "id": "job-9",
        "kind": "generate",
        "share_id": None,
        "state": "started",
        "worker": "celery@gpu-1",
        "attempts": 2,
        "error": None,
        "updated_at": "2025-01-02T03:04:05Z",
        "queue": None,
        "jobs_ahead_at_most": None,
    }
    unknown = app.client.get("/jobs/job-0")
    assert (unknown.status_code, unknown.json()) == (404, {"error": str(unknown_job("job-0"))})


def test_delete_cancels_the_job(served: Serve) -> None:
    app = served()
    response = app.client.delete("/jobs/job-9")
    assert response.status_code == 202
    assert response.json() == {"id": "job-9", "status": "cancelling"}
    assert app.fake.cancelled == ["job-9"]


def test_a_summary_is_queued_and_read_back(served: Serve) -> None:
    app = served()
    queued = app.client.post("/jobs/summarize", json={"share_id": "s1", "content": {"text": "x"}})
    assert queued.status_code == 202
    assert queued.headers["location"] == "/jobs/job-1"
    assert queued.json() == {
        "id": "job-1",
        "kind": "summarize",
        "share_id": "s1",
        "state": "queued",
        "worker": None,
        "attempts": 0,
        "error": None,
        "updated_at": None,
        "queue": None,
        "jobs_ahead_at_most": None,
    }
    assert [r.share_id for r in app.fake.summarized] == ["s1"]
    view = JobView("job-1", JobState.SUCCESS, JobKind.SUMMARIZE, "s1", attempts=1)
    app.fake.summaries["s1"] = (view, {"summary": "Short."})
    summary = app.client.get("/jobs/summarize/s1")
    assert summary.json() == view.to_json() | {"result": {"summary": "Short."}}
    none = app.client.get("/jobs/summarize/s2")
    assert (none.status_code, none.json()) == (
        404,
        {"error": "no summary job of share id 's2' is known"},
    )


def test_a_summary_the_contract_refuses_is_a_400(served: Serve) -> None:
    app = served()
    response = app.client.post("/jobs/summarize", json={"share_id": "s1", "content": {}})
    assert response.status_code == 400
    assert response.json() == {"error": "invalid request: content.text: Field required"}
    assert app.fake.summarized == []


@pytest.mark.parametrize("path", ["/api/tags", "/v1/models", "/jobs/job-1"])
def test_keyed_routes_ask_for_a_key_and_health_routes_do_not(served: Serve, path: str) -> None:
    app = served(require_keys=True)
    refused = app.client.get(path)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert app.client.get("/healthz").json() == {"status": "ok"}
    assert app.client.get("/readyz").json() == {"status": "ready"}


def test_readyz_names_what_it_cannot_reach(served: Serve) -> None:
    app = served()
    app.fake.problems = {"broker": "[Errno 111] Connection refused"}
    response = app.client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "broker": "[Errno 111] Connection refused"}


def test_a_model_is_listed_by_its_servers_own_name(served: Serve) -> None:
    """A server that lists ``smollm2`` (no tag, as OpenAI-compatible servers do) serves the
    model whose canonical name is ``smollm2:latest``: clients see the server's name."""
    app = served()
    app.fake.served = [
        ServedModel("smollm2:latest", LATE, B.expires_at, (A,), ("a@gpu",), {}, "smollm2")
    ]
    assert [m["name"] for m in app.client.get("/api/tags").json()["models"]] == ["smollm2"]
    assert [m["id"] for m in app.client.get("/v1/models").json()["data"]] == ["smollm2"]
    assert [m["model"] for m in app.client.get("/api/ps").json()["models"]] == ["smollm2"]
