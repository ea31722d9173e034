"""The Ollama client against the simulator: answers parsed, failures mapped to their kind."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ollama_worker.errors import PermanentError, TransientError
from ollama_worker.ollama import ModelNotFound, OllamaClient, OllamaRejected, OllamaUnavailable
from ollama_worker.testing import OllamaSimulator, SimConfig


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=["llama3.2:1b"], context_length=8192)) as server:
        yield server


@pytest.fixture
def client(sim: OllamaSimulator) -> Iterator[OllamaClient]:
    with OllamaClient(sim.url, read_timeout=5) as made:
        yield made


def test_generate_accumulates_the_stream_and_keeps_the_counts(client: OllamaClient) -> None:
    done = client.generate("llama3.2:1b", "Say something", options={"num_predict": 9})

    assert len(done.text.split()) == 9
    assert done.completion_tokens == 9
    assert done.done_reason == "length"
    assert done.prompt_tokens > 0
    assert done.total_duration_ns >= done.eval_duration_ns > 0


def test_chat_returns_the_assistant_text(client: OllamaClient) -> None:
    done = client.chat("llama3.2:1b", [{"role": "user", "content": "Hello"}])

    assert done.text.strip()
    assert done.model == "llama3.2:1b"


def test_models_and_context_length(client: OllamaClient) -> None:
    assert client.has_model("llama3.2:1b")
    assert not client.has_model("llama3.2")
    assert client.context_length("llama3.2:1b") == 8192
    assert client.version()


def test_pull_reports_progress_then_the_model_is_there(client: OllamaClient) -> None:
    seen: list[str] = []

    client.pull("phi3:mini", progress=lambda chunk: seen.append(chunk["status"]))

    assert seen[0] == "pulling manifest"
    assert seen[-1] == "success"
    assert client.has_model("phi3:mini")


def test_model_missing_from_the_hub_is_permanent(
    sim: OllamaSimulator, client: OllamaClient
) -> None:
    sim.config.hub = ["llama3.2:1b"]

    with pytest.raises(ModelNotFound, match="cannot be pulled"):
        client.pull("nope:1b")


def test_unknown_model_is_permanent(client: OllamaClient) -> None:
    with pytest.raises(ModelNotFound) as caught:
        client.generate("missing:1b", "hi")

    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_and_gateway_errors_are_transient(
    sim: OllamaSimulator, client: OllamaClient, status: int
) -> None:
    sim.config.fail_status = status
    sim.config.fail_first = 1

    with pytest.raises(OllamaUnavailable, match=str(status)) as caught:
        client.generate("llama3.2:1b", "hi")

    assert isinstance(caught.value, TransientError)
    assert client.generate("llama3.2:1b", "hi").text


def test_bad_request_is_permanent(sim: OllamaSimulator, client: OllamaClient) -> None:
    sim.config.fail_status = 400
    sim.config.fail_first = 1

    with pytest.raises(OllamaRejected, match="400"):
        client.chat("llama3.2:1b", [{"role": "user", "content": "hi"}])


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with OllamaClient(f"http://127.0.0.1:{port}") as client, pytest.raises(OllamaUnavailable):
        client.generate("llama3.2:1b", "hi")


def test_a_stalled_stream_times_out_as_transient(sim: OllamaSimulator) -> None:
    sim.config.latency_ms = 2000
    with OllamaClient(sim.url, read_timeout=0.2) as client, pytest.raises(OllamaUnavailable):
        client.generate("llama3.2:1b", "hi")
