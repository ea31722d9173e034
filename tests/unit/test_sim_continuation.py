"""The simulator continues a begun answer as Ollama (a trailing assistant message) and vLLM
(``continue_final_message``) do, and both worker clients ask it to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.ollama import OllamaClient
from ollama_worker.openai_backend import OpenAIClient

MODEL = "llama3.2:1b"
ASK = [{"role": "user", "content": "Tell me about avocados."}]


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=[MODEL], default_tokens=30)) as server:
        yield server


@pytest.fixture
def ollama(sim: OllamaSimulator) -> Iterator[OllamaClient]:
    sim.clear()
    with OllamaClient(sim.url) as client:
        yield client


@pytest.fixture
def openai(sim: OllamaSimulator) -> Iterator[OpenAIClient]:
    sim.clear()
    with OpenAIClient(f"{sim.url}/v1") as client:
        yield client


def _split(text: str, words: int) -> tuple[str, str]:
    """The first ``words`` simulated tokens of ``text`` (a token is a word and the space
    before it), and the rest."""
    cut = len(" ".join(text.split(" ")[:words]))
    return text[:cut], text[cut:]


def _chat(sim: OllamaSimulator, messages: list[dict[str, str]], **extra: Any) -> str:
    body = {"model": MODEL, "messages": messages, "stream": False, **extra}
    return str(httpx.post(f"{sim.url}/api/chat", json=body).json()["message"]["content"])


def test_ollama_chat_continues_a_trailing_assistant_message(
    sim: OllamaSimulator, ollama: OllamaClient
) -> None:
    whole = ollama.chat(MODEL, ASK).text
    begun, rest = _split(whole, 7)

    continued = _chat(sim, [*ASK, {"role": "assistant", "content": begun}])

    assert rest
    assert continued == rest


@pytest.mark.parametrize("cut", [1, 4, 13], ids=["one", "inside-a-word", "many"])
def test_a_partial_that_ends_inside_a_token_gets_its_rest_first(
    sim: OllamaSimulator, ollama: OllamaClient, cut: int
) -> None:
    whole = ollama.chat(MODEL, ASK).text

    continued = _chat(sim, [*ASK, {"role": "assistant", "content": whole[:cut]}])

    assert whole[:cut] + continued == whole


def test_an_assistant_message_the_answer_does_not_begin_gets_an_answer_of_its_own(
    sim: OllamaSimulator, ollama: OllamaClient
) -> None:
    whole = ollama.chat(MODEL, ASK).text

    other = _chat(sim, [*ASK, {"role": "assistant", "content": "Something else."}])

    assert other
    assert not whole.endswith(other)


def test_a_continuation_counts_num_predict_in_new_tokens(
    sim: OllamaSimulator, ollama: OllamaClient
) -> None:
    whole = ollama.chat(MODEL, ASK, options={"num_predict": 12}).text
    begun, _ = _split(whole, 5)

    continued = _chat(
        sim, [*ASK, {"role": "assistant", "content": begun}], options={"num_predict": 7}
    )

    assert begun + continued == whole


def test_a_prompt_is_answered_as_the_chat_of_its_system_and_user_messages(
    ollama: OllamaClient,
) -> None:
    prompt = ollama.generate(MODEL, "Why?", system="Be brief.").text
    chat = ollama.chat(
        MODEL, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    ).text

    assert prompt == chat


@pytest.mark.parametrize("kind", ["chat", "prompt"])
def test_the_ollama_client_continues_and_hands_on_only_the_new_text(
    sim: OllamaSimulator, ollama: OllamaClient, kind: str
) -> None:
    whole = ollama.chat(MODEL, ASK).text
    begun, rest = _split(whole, 9)
    chunks: list[str] = []

    if kind == "chat":
        done = ollama.chat(MODEL, ASK, on_chunk=chunks.append, partial=begun)
    else:
        done = ollama.generate(MODEL, ASK[0]["content"], on_chunk=chunks.append, partial=begun)

    assert done.text == whole
    assert "".join(chunks) == rest
    assert done.usage.completion_tokens == len(chunks)
    last = sim.requests.last("/api/chat").body
    assert last["messages"][-1] == {"role": "assistant", "content": begun}
    assert not sim.requests.to("/api/generate")


def test_the_openai_client_continues_with_continue_final_message(
    sim: OllamaSimulator, openai: OpenAIClient
) -> None:
    whole = openai.chat(MODEL, ASK).text
    begun, rest = _split(whole, 9)
    chunks: list[str] = []

    done = openai.chat(MODEL, ASK, on_chunk=chunks.append, partial=begun)

    assert done.text == whole
    assert "".join(chunks) == rest
    body = sim.requests.last("/v1/chat/completions").body
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": begun}


def test_openai_side_refuses_continue_final_message_with_a_generation_prompt(
    sim: OllamaSimulator,
) -> None:
    body = {
        "model": MODEL,
        "messages": [*ASK, {"role": "assistant", "content": "Avocados"}],
        "continue_final_message": True,
    }

    response = httpx.post(f"{sim.url}/v1/chat/completions", json=body)

    assert response.status_code == 400
    assert "add_generation_prompt" in response.json()["error"]["message"]


def test_openai_side_without_the_flag_starts_a_new_answer(
    sim: OllamaSimulator, openai: OpenAIClient
) -> None:
    whole = openai.chat(MODEL, ASK).text
    begun, rest = _split(whole, 9)
    body = {"model": MODEL, "messages": [*ASK, {"role": "assistant", "content": begun}]}

    answer = httpx.post(f"{sim.url}/v1/chat/completions", json=body).json()

    assert answer["choices"][0]["message"]["content"] != rest
