"""A 1,000-line batch on two workers, one SIGKILLed in the middle of it (a notebook that
vanishes) while its slots' answers are held in flight: every ``custom_id`` is in the output
exactly once, the model answered each line exactly once, and the only other calls are the
dead worker's, cut (the simulator counts each call by how it ended)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from pydantic import SecretStr

from avocado_shared import Settings
from avocado_sim import OllamaSimulator, Outcome, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.processes import wait_for

WAIT = 300
MODEL = "llama3.2:1b"
LINES = 1000
SLOTS = 2  # each worker's concurrency: the jobs the killed one can hold


@pytest.fixture
def quick_sim() -> Iterator[OllamaSimulator]:
    """Short answers, a few milliseconds each, so 1,000 lines take seconds."""
    with OllamaSimulator(SimConfig(models=[MODEL], default_tokens=8, latency_ms=20)) as server:
        yield server


def test_a_batch_survives_a_sigkilled_worker_and_runs_each_line_once(
    quick_sim: OllamaSimulator,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
    settings: Settings,
    tmp_path: Path,
) -> None:
    database = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    fleet = settings.model_copy(update={"database_url": SecretStr(database)})
    env = {"AVOCADO_DATABASE_URL": database, "AVOCADO_JOB_LEASE_S": "3"}
    doomed = worker_factory.process(quick_sim.url, concurrency=SLOTS, **env)
    worker_factory(quick_sim.url, concurrency=SLOTS, **env)
    gateway = gateway_factory(
        fleet=fleet, files_dir=tmp_path / "files", batch_poll_s=0.1, batch_window=16
    )
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", timeout=60)
    tag = f"line-{uuid.uuid4().hex[:8]}"  # this test's prompts, among any other test's
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{tag} {i}"}]},
        }
        for i in range(LINES)
    ]
    raw = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = sdk.files.create(file=("big.jsonl", raw), purpose="batch")
    made = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def answered() -> int:
        counts = sdk.batches.retrieve(made.id).request_counts
        return 0 if counts is None else counts.completed

    wait_for(lambda: answered() >= LINES // 2, timeout=WAIT, what="half the lines answered")
    # Every slot of both workers in a model call, its answer held: the doomed worker dies
    # with calls in flight, none between its call and its result.
    quick_sim.hold()
    wait_for(lambda: quick_sim.held == 2 * SLOTS, timeout=30, what="every slot's answer held")
    doomed.kill()
    quick_sim.release()
    ended = wait_for(
        lambda: (found := sdk.batches.retrieve(made.id)).status == "completed" and found,
        timeout=WAIT,
        what="the batch completed",
    )

    assert ended.output_file_id is not None
    assert ended.error_file_id is None
    output = [json.loads(r) for r in sdk.files.content(ended.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in output) == sorted(f"line-{i}" for i in range(LINES))
    assert {r["response"]["status_code"] for r in output} == {200}
    # Each line answered by the model exactly once; the only other calls are those the killed
    # worker was in, cut, at most one per slot of it.
    calls = [
        (r.body["messages"][0]["content"], r.outcome)
        for r in quick_sim.requests.to("/api/chat")
        if r.body["messages"][0]["content"].startswith(f"{tag} ")
    ]
    answered_calls = Counter(prompt for prompt, outcome in calls if outcome is Outcome.ANSWERED)
    others = Counter(outcome for _, outcome in calls if outcome is not Outcome.ANSWERED)
    assert answered_calls == {f"{tag} {i}": 1 for i in range(LINES)}
    assert others == {Outcome.CUT: SLOTS}
    print(f"calls: {len(calls)}, answered {answered_calls.total()}, cut {others[Outcome.CUT]}")
