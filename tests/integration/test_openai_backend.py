"""A worker on AVOCADO_BACKEND=openai, end to end: producer -> RabbitMQ -> worker subprocess
-> the simulator's OpenAI-compatible /v1 side, faults included."""

from __future__ import annotations

import json

import httpx
import pytest

from avocado_shared import JobFailed, Producer
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory

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

        sim.clear()
        with pytest.raises(JobFailed, match="cannot be pulled"):
            producer.generate("Hello", model="qwen2.5:0.5b").get(timeout=WAIT)
        assert not sim.requests.to(CHAT), "failed at once, no generation tried"

    assert KEY not in worker.log_text()
