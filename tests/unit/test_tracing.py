"""Traces are off unless the standard ``OTEL_*`` variables ask for them: each case runs in a
fresh interpreter (a process has one tracer provider), publishes a span the way the producer
does, and reports whether it recorded and what went into a message's headers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from avocado_shared.tracing import tracing_requested

_PROBE = """
import json
from avocado_shared.tracing import inject_headers, publish_span, setup_tracing, tracing_active
on = setup_tracing("probe")
with publish_span("avocado.generate", "job-1", "ml.model.m.batch") as span:
    headers = inject_headers({})
    recording = span.is_recording()
print("report:", json.dumps({"on": on, "active": tracing_active(), "recording": recording,
                  "headers": headers}))
"""


def _probe(**env: str) -> tuple[dict[str, object], str]:
    """What the probe reports, and everything else it printed (a console exporter's spans)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    report = next(line for line in lines if line.startswith("report: "))
    return json.loads(report.removeprefix("report: ")), done.stdout.replace(report, "")


def test_with_no_otel_variable_nothing_is_recorded_or_sent() -> None:
    report, _ = _probe()

    assert report == {"on": False, "active": False, "recording": False, "headers": {}}


def test_otel_traces_exporter_turns_traces_on_and_the_context_goes_into_the_headers() -> None:
    report, printed = _probe(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="probe-svc")

    assert report["on"] is True
    assert report["active"] is True
    assert report["recording"] is True
    headers = report["headers"]
    assert isinstance(headers, dict)
    version, trace_id, span_id, flags = str(headers["traceparent"]).split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1  # sampled
    assert '"name": "publish ml.model.m.batch"' in printed  # flushed at exit
    assert '"service.name": "probe-svc"' in printed


def test_the_sdk_disabled_wins_over_an_exporter() -> None:
    report, _ = _probe(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true")

    assert report["on"] is False
    assert report["recording"] is False


@pytest.mark.parametrize(
    ("env", "requested"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_which_variables_ask_for_traces(env: dict[str, str], requested: bool) -> None:
    assert tracing_requested(env) is requested
