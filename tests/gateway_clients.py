"""Clients no one here wrote (the official ``ollama`` client, the ``openai`` SDK) on a gateway,
and what they read checked against the job's stored result."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import ollama
import openai

from avocado_shared import GenerateResult, Producer
from tests.gateway import InProcessGateway

__all__ = ["JOB_ID_HEADER", "Fleet", "assert_counts"]

JOB_ID_HEADER = "x-avocado-job-id"


@dataclass
class Fleet:
    """The gateway, its worker's producer, and the job ids of the responses it gave."""

    gateway: InProcessGateway
    producer: Producer
    wait: float = 90.0  # for an answer, and for a job's result
    job_ids: list[str] = field(default_factory=list)

    def ollama(self) -> ollama.Client:
        """The official client, noting each response's job id."""
        hooks = {"response": [self._note]}
        return ollama.Client(host=self.gateway.url, event_hooks=hooks, timeout=self.wait)

    def openai(self) -> openai.OpenAI:
        """The OpenAI SDK on the gateway's /v1 (no key: keys are not done yet)."""
        url = f"{self.gateway.url}/v1"
        return openai.OpenAI(base_url=url, api_key="none", timeout=self.wait)

    def _note(self, response: httpx.Response) -> None:
        if JOB_ID_HEADER in response.headers:
            self.job_ids.append(response.headers[JOB_ID_HEADER])

    def result(self, job_id: str) -> GenerateResult:
        """The job's Celery result, checked against its ``ml_results`` row."""
        result = self.producer.handle(job_id).get(timeout=self.wait)
        assert isinstance(result, GenerateResult)
        row = self.producer.results.get(job_id)
        assert row is not None
        assert row.result is not None
        assert row.result["text"] == result.text
        return result

    def last_result(self) -> GenerateResult:
        assert len(self.job_ids) == 1, self.job_ids
        return self.result(self.job_ids[0])


def assert_counts(
    final: ollama.GenerateResponse | ollama.ChatResponse, result: GenerateResult
) -> None:
    """An Ollama answer's last chunk says what the stored result does, in Ollama's units."""
    assert final.done is True
    assert final.done_reason == result.done_reason
    assert final.model == result.model
    assert final.prompt_eval_count == result.prompt_tokens
    assert final.eval_count == result.completion_tokens
    assert final.eval_count is not None
    assert final.eval_count > 0
    assert final.total_duration == round(result.total_duration_ms * 1e6)
    assert final.load_duration == round(result.load_duration_ms * 1e6)
    assert final.prompt_eval_duration == round(result.prompt_eval_duration_ms * 1e6)
    assert final.eval_duration == round(result.eval_duration_ms * 1e6)
