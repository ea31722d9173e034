"""A worker on AVOCADO_BACKEND=openai, end to end: producer -> RabbitMQ -> worker subprocess
-> the simulator's OpenAI-compatible /v1 side, faults included."""

from __future__ import annotations

import json

import httpx

from avocado_shared import Producer
from avocado_shared.routing import Lane, lane_queue_name
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.processes import wait_for
from tests.rabbit import purge, queue_depth

MODEL = "llama3.2:1b"
CHAT = "/v1/chat/completions"
KEY = "sk-e2e-not-for-logs"
WAIT = 60


def test_jobs_run_on_an_openai_compatible_server(
    producer: Producer, worker_factory: WorkerFactory
) -> None:
    config = SimConfig(
        models=[MODEL], context_length=1024, fail_first=1, fail_status=429, retry_after_s=1
    )
    with OllamaSimulator(config) as sim:
        worker = worker_factory(
            sim.url,
            AVOCADO_BACKEND="openai",
            AVOCADO_BACKEND_URL=f"{sim.url}/v1",
            AVOCADO_BACKEND_API_KEY=KEY,
        )

        # A prompt job whose first call is rate-limited: retried after Retry-After.
        result = producer.generate("Why is the sky blue?", system="Answer briefly.").get(
            timeout=WAIT
        )
        first, second = sim.requests.to(CHAT)
        assert first.body == second.body
        assert second.body["messages"][-1] == {"role": "user", "content": "Why is the sky blue?"}
        assert second.headers["Authorization"] == f"Bearer {KEY}"
        whole = httpx.post(f"{sim.url}{CHAT}", json={**second.body, "stream": False}).json()
        assert result.text == whole["choices"][0]["message"]["content"]
        assert result.prompt_tokens == whole["usage"]["prompt_tokens"]
        assert result.completion_tokens == whole["usage"]["completion_tokens"]
        assert result.eval_duration_ms > 0, "llama.cpp-style timings reach the result"
        assert not [r for r in sim.requests if r.path.startswith("/api/")], "no Ollama API"

        answer = producer.generate("A JSON object, please", format="json").get(timeout=WAIT)
        assert isinstance(json.loads(answer.text), dict)

        # Longer than the server's 1024-token context (the worker's own setting says 4096).
        text = "\n\n".join(" ".join(f"w{i}x{j}" for j in range(80)) + "." for i in range(30))
        summary = producer.summarize("openai-long", text, options={"max_words": 40}).get(
            timeout=WAIT
        )
        assert summary.chunks > 1
        assert summary.summary

        # A model the server does not serve: its job waits for a node that does; this one,
        # which cannot pull it, never takes it.
        sim.clear()
        waiting = producer.generate("Hello", model="qwen2.5:0.5b")
        queue = lane_queue_name("qwen2.5:0.5b", Lane.BATCH)
        wait_for(
            lambda: sim.requests.to("/v1/models") and queue_depth(producer, queue) == 1,
            timeout=WAIT,
            what="a round of the node's models with the job queued",
        )
        assert not sim.requests.to(CHAT)
        assert waiting.state == "PENDING"
        purge(producer, queue)

    assert KEY not in worker.log_text()
