"""A job belongs to the key that queued it, on a fake gateway (``tests/fake_gateway.py``):
another key gets the very 404 an unknown job gets from ``GET`` and ``DELETE /jobs/{id}`` and
the summary route, and cancels nothing; an admin key sees every job, those of no key included;
a gateway that asks for no keys shows every job to everyone. On the real queue:
tests/integration/test_infer_ownership.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest

from avocado_infer.job_state import JobState, JobView, unknown_job, unknown_summary
from avocado_shared.contracts import JobKind
from avocado_shared.keys import ApiKey
from tests.fake_gateway import MODEL, USAGE, Served

Serve = Callable[..., Served]

A, B, ADMIN = ({"Authorization": f"Bearer avk_{name}"} for name in ("a", "b", "admin"))


def _keyed(served: Serve) -> Served:
    """A gateway asking for keys, with keys ``a`` and ``b`` and an admin key; ``a`` has run
    one generation (``job-1``), whose state reads started."""
    app = served(require_keys=True)
    made = datetime.now()
    app.fake.keys = {
        "avk_a": ApiKey("a", rpm=0, concurrency=0, created_at=made),
        "avk_b": ApiKey("b", rpm=0, concurrency=0, created_at=made),
        "avk_admin": ApiKey("root", rpm=0, concurrency=0, created_at=made, admin=True),
    }
    app.fake.script("Hi", USAGE)
    body = {"model": MODEL, "prompt": "Hi", "stream": False}
    assert app.client.post("/api/generate", json=body, headers=A).status_code == 200
    app.fake.views["job-1"] = JobView("job-1", JobState.STARTED, JobKind.GENERATE, attempts=1)
    return app


def test_a_generation_is_published_as_its_keys_job(served: Serve) -> None:
    app = _keyed(served)
    assert app.fake.owners == {"job-1": {"a"}}


def test_another_key_gets_the_404_of_an_unknown_job_and_cancels_nothing(served: Serve) -> None:
    app = _keyed(served)

    read = app.client.get("/jobs/job-1", headers=B)
    cancel = app.client.delete("/jobs/job-1", headers=B)
    unknown = app.client.get("/jobs/job-2", headers=B)
    unknown_cancel = app.client.delete("/jobs/job-2", headers=B)

    for answer, job_id in [(read, "job-1"), (cancel, "job-1"), (unknown, "job-2")]:
        assert (answer.status_code, answer.json()) == (404, {"error": str(unknown_job(job_id))})
    assert unknown_cancel.status_code == 404
    # The two answers differ in the id they echo, nothing else.
    assert read.text.replace("job-1", "job-2") == unknown.text
    assert read.headers.keys() == unknown.headers.keys()
    assert app.fake.cancelled == []


def test_its_own_key_and_an_admin_key_read_and_cancel_it(served: Serve) -> None:
    app = _keyed(served)

    own = app.client.get("/jobs/job-1", headers=A)
    admin = app.client.get("/jobs/job-1", headers=ADMIN)
    cancelled = [app.client.delete("/jobs/job-1", headers=who).status_code for who in (A, ADMIN)]

    assert own.status_code == admin.status_code == 200
    assert own.json() == admin.json()
    assert own.json()["state"] == "started"
    assert cancelled == [202, 202]
    assert app.fake.cancelled == ["job-1", "job-1"]


def test_a_job_of_no_key_is_an_admin_keys_only(served: Serve) -> None:
    """Queued by the Python API or the CLI: no gateway noted an owner."""
    app = _keyed(served)
    app.fake.views["cli-job"] = JobView("cli-job", JobState.SUCCESS, JobKind.GENERATE)

    assert app.client.get("/jobs/cli-job", headers=A).status_code == 404
    assert app.client.delete("/jobs/cli-job", headers=B).status_code == 404
    assert app.client.get("/jobs/cli-job", headers=ADMIN).json()["state"] == "success"
    assert app.client.delete("/jobs/cli-job", headers=ADMIN).status_code == 202
    assert app.fake.cancelled == ["cli-job"]


def test_a_summary_is_its_keys_and_an_admin_keys(served: Serve) -> None:
    app = _keyed(served)
    body = {"share_id": "s1", "content": {"text": "x"}}
    queued = app.client.post("/jobs/summarize", json=body, headers=A)
    assert queued.status_code == 202
    job_id = queued.json()["id"]
    view = JobView(job_id, JobState.SUCCESS, JobKind.SUMMARIZE, "s1", attempts=1)
    app.fake.summaries["s1"] = (view, {"summary": "Short."})

    own = app.client.get("/jobs/summarize/s1", headers=A)
    other = app.client.get("/jobs/summarize/s1", headers=B)
    admin = app.client.get("/jobs/summarize/s1", headers=ADMIN)
    unknown = app.client.get("/jobs/summarize/s2", headers=B)

    assert app.fake.owners[job_id] == {"a"}
    assert own.json() == admin.json() == view.to_json() | {"result": {"summary": "Short."}}
    assert (other.status_code, other.json()) == (404, {"error": str(unknown_summary("s1"))})
    assert other.text.replace("s1", "s2") == unknown.text


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_without_keys_everyone_sees_every_job(served: Serve, method: str) -> None:
    app = served()  # AVOCADO_INFER_REQUIRE_KEYS=false: no key to tell callers apart
    app.fake.views["cli-job"] = JobView("cli-job", JobState.SUCCESS, JobKind.GENERATE)

    answer = app.client.request(method, "/jobs/cli-job")

    assert answer.status_code == (200 if method == "GET" else 202)
    assert app.fake.owners == {}
