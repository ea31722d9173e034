"""The Ollama client against the simulator: answers parsed, failures mapped to their kind."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.errors import JobTimedOut, PermanentError, TransientError
from ollama_worker.ollama import (
    DeadlinePassed,
    ModelNotFound,
    OllamaClient,
    OllamaRejected,
    OllamaUnavailable,
)
from tests.services import free_port


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
    assert done.usage.completion_tokens == 9
    assert done.usage.done_reason == "length"
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_duration_ms >= done.usage.eval_duration_ms > 0


def test_chat_returns_the_assistant_text(client: OllamaClient) -> None:
    done = client.chat("llama3.2:1b", [{"role": "user", "content": "Hello"}])

    assert done.text.strip()
    assert done.usage.model == "llama3.2:1b"


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

    with pytest.raises(OllamaRejected, match=r"^ollama refused the request: "):
        client.chat("llama3.2:1b", [{"role": "user", "content": "hi"}])


def test_connection_refused_is_transient() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with OllamaClient(url) as client, pytest.raises(OllamaUnavailable):
        client.generate("llama3.2:1b", "hi")


def test_a_stalled_stream_times_out_as_transient(sim: OllamaSimulator) -> None:
    sim.config.latency_ms = 2000
    with OllamaClient(sim.url, read_timeout=0.2) as client, pytest.raises(OllamaUnavailable):
        client.generate("llama3.2:1b", "hi")


def test_a_deadline_stops_a_stream_that_keeps_answering(sim: OllamaSimulator) -> None:
    # Each token comes well within the read timeout; only the deadline can end the call.
    sim.config.tokens_per_s = 20
    with OllamaClient(sim.url, read_timeout=5) as client:
        with client.deadline(0.3), pytest.raises(DeadlinePassed) as caught:
            client.generate("llama3.2:1b", "hi", options={"num_predict": 200})
        assert isinstance(caught.value, JobTimedOut)
        assert isinstance(caught.value, PermanentError), "an overrun is not retried"

        sim.config.tokens_per_s = None
        assert client.generate("llama3.2:1b", "hi").text, "the deadline ends with its block"


def test_a_deadline_cuts_the_wait_for_a_silent_server(sim: OllamaSimulator) -> None:
    sim.config.latency_ms = 3000
    with (
        OllamaClient(sim.url, read_timeout=5) as client,
        client.deadline(0.3),
        pytest.raises(DeadlinePassed),
    ):
        client.generate("llama3.2:1b", "hi")


def test_a_deadline_cuts_the_wait_for_a_server_that_never_answers() -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()  # connections complete in the kernel; nothing is ever read or sent
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        with (
            OllamaClient(url, read_timeout=30) as client,
            client.deadline(0.3),
            pytest.raises(DeadlinePassed),
        ):
            client.has_model("llama3.2:1b")
        # Without a deadline the same silence is a read timeout: transient, retried.
        with OllamaClient(url, read_timeout=0.3) as plain, pytest.raises(OllamaUnavailable):
            plain.version()


def test_a_spent_deadline_makes_no_request(sim: OllamaSimulator) -> None:
    with OllamaClient(sim.url) as client, client.deadline(0), pytest.raises(DeadlinePassed):
        client.generate("llama3.2:1b", "hi")
    assert sim.generation_calls == 0


def test_deadlines_belong_to_their_thread(sim: OllamaSimulator) -> None:
    sim.config.tokens_per_s = 50
    outcome: dict[str, object] = {}

    def other() -> None:
        outcome["text"] = client.generate("llama3.2:1b", "hi", options={"num_predict": 25}).text

    with OllamaClient(sim.url) as client, client.deadline(0.05):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(str(outcome["text"]).split()) == 25


@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [({"fail_first": 1, "fail_status": 429, "retry_after_s": 3}, 3.0), ({"drop_first": 1}, None)],
)
def test_a_429_and_a_stream_cut_midway_are_transient(
    sim: OllamaSimulator, client: OllamaClient, fault: dict[str, Any], retry_after: float | None
) -> None:
    for name, value in fault.items():
        setattr(sim.config, name, value)
    messages = [{"role": "user", "content": "hi"}]

    with pytest.raises(OllamaUnavailable) as caught:
        client.chat("llama3.2:1b", messages)

    assert caught.value.retry_after == retry_after
    assert client.chat("llama3.2:1b", messages).text, "only one call failed"
