"""Schemathesis fuzzes avocado-infer from its own OpenAPI schema: a real gateway (uvicorn, the
session's broker and Redis, API keys asked for) with an in-process worker on the simulator
behind it, so that a valid generation is answered. Every request carries a valid key, so the
bodies reach the routes. Whatever comes in, no response is a server error, and each one
matches what the schema says of its status and content type."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from avocado_infer import InferSettings, create_app
from avocado_shared import Settings
from avocado_shared.keys import KeyStore
from tests.gateway import InProcessGateway
from tests.inprocess import InProcessWorker

MODEL = "llama3.2:1b"
# The simulator makes a whole answer before it streams it, however long: a length it makes
# at once (a real server stops at its end of text).
MAX_TOKENS = 32
LENGTHS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Not negative_data_rejection: the gateway reads bodies as pydantic's lax mode does (0 for
# false, "5" for 5), as lenient as the clients it serves expect; such a body is a job like any
# other, and no server error either.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def statuses() -> Iterator[Counter[int]]:
    """The status of every response the fuzz got, said at the end of the module."""
    seen: Counter[int] = Counter()
    yield seen
    server_errors = sum(n for status, n in seen.items() if status >= 500)
    print(f"\nschemathesis: {seen.total()} requests, {server_errors} server errors: {dict(seen)}")


@pytest.fixture(scope="module")
def gateway(worker: InProcessWorker, settings: Settings) -> Iterator[InProcessGateway]:
    """A gateway with a short stream timeout (a request that waited past it would be a 504):
    every valid request is answered long before."""
    made = InProcessGateway(InferSettings(fleet=settings, stream_timeout_s=20)).start()
    yield made
    made.stop()


@pytest.fixture(scope="module")
def secret(settings: Settings) -> Iterator[str]:
    """A valid API key without limits, revoked at the end."""
    with KeyStore.from_settings(settings) as store:
        key, made = store.create(f"fuzz-{uuid.uuid4().hex[:8]}")
        yield made
        store.revoke(key.name)


# The schema as the app makes it (making the app connects to nothing), known when the tests
# are collected, one per operation; the first test checks that the gateway serves this very
# schema. (schemathesis.pytest.from_fixture, which would read it from the running gateway,
# fails on pytest 9.2: it sets the removed Node._nodeid.)
OPENAPI = create_app(InferSettings()).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_the_gateway_serves_the_schema_fuzzed(gateway: InProcessGateway) -> None:
    served = httpx.get(f"{gateway.url}/openapi.json", timeout=10)

    assert served.status_code == 200
    assert served.json() == OPENAPI


def _servable(case: schemathesis.Case) -> None:
    """The model the worker serves, and an answer the simulator can make: which models exist
    and how long an answer may be are not what this fuzzes (a model no node serves fails its
    job: 502). Neither change makes a valid body invalid or an invalid one valid: the schema
    asks any string of ``model`` and any whole number of at least 1 of the lengths."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    options = body.get("options")
    for where, name in [(body, n) for n in LENGTHS] + [(options, "num_predict")]:
        # JSON's whole numbers include 1e20, which the gateway reads as an int too.
        if isinstance(where, dict) and _whole(where.get(name)) and where[name] > MAX_TOKENS:
            where[name] = MAX_TOKENS


def _whole(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_the_schema_holds(
    case: schemathesis.Case, gateway: InProcessGateway, secret: str, statuses: Counter[int]
) -> None:
    _servable(case)
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {secret}"}

    response = case.call(base_url=gateway.url, timeout=60)
    statuses[response.status_code] += 1

    case.validate_response(response, checks=CHECKS)
