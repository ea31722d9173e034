"""What a worker learns of the models its server serves (``Backend.describe``), against the
simulator: Ollama's ``/api/show``, an OpenAI-compatible server's ``/v1/models`` (vLLM) and
llama.cpp's ``/props``; and the simulator's capabilities by model name."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Literal

import pytest

from avocado_shared.fleet import ModelMeta
from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.ollama import ModelNotFound, OllamaClient
from ollama_worker.openai_backend import OpenAIClient

CHAT, EMBED, VISION = "llama3.2:1b", "nomic-embed-text:latest", "llava:7b"


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=[CHAT, EMBED, VISION], context_length=8192)) as server:
        yield server


def test_ollama_show_is_kept_without_the_tokenizer(sim: OllamaSimulator) -> None:
    with OllamaClient(sim.url) as client:
        chat = client.describe(CHAT)
        embed = client.describe(EMBED)
        vision = client.describe(VISION)

    assert chat.model_dump(exclude={"modified_at"}) == {
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1B",
        "quantization_level": "Q4_K_M",
        "architecture": "llama",
        "parameter_count": 1_000_000_000,
        "context_length": 8192,
        "embedding_length": 3072,
        "capabilities": ["completion", "tools"],
    }
    assert isinstance(chat.modified_at, datetime)
    assert embed.capabilities == ["embedding"]
    assert vision.capabilities == ["completion", "tools", "vision"]
    assert vision.parameter_size == "7B"


def test_ollama_show_of_a_model_it_lacks_is_model_not_found(sim: OllamaSimulator) -> None:
    with OllamaClient(sim.url) as client, pytest.raises(ModelNotFound):
        client.describe("qwen3:8b")


@pytest.mark.parametrize(
    ("first", "said_in", "expected"),
    [
        # llama.cpp's server: its context, modalities and template's tools in /props.
        (CHAT, "props", ModelMeta(context_length=8192, capabilities=["completion", "tools"])),
        (
            VISION,
            "props",
            ModelMeta(context_length=8192, capabilities=["completion", "tools", "vision"]),
        ),
        # vLLM: max_model_len in /v1/models, no /props.
        (CHAT, "models", ModelMeta(context_length=8192, capabilities=["completion"])),
        # A server that says nothing of either.
        (CHAT, None, ModelMeta(capabilities=["completion"])),
    ],
)
def test_an_openai_compatible_server_says_what_it_says(
    sim: OllamaSimulator,
    first: str,
    said_in: Literal["models", "props"] | None,
    expected: ModelMeta,
) -> None:
    sim.config.models = [first, *(m for m in sim.config.models if m != first)]
    sim.config.openai_context_in = said_in
    with OpenAIClient(f"{sim.url}/v1") as client:
        said = client.describe(first)

    assert said.model_dump(exclude={"modified_at"}) == expected.model_dump(exclude={"modified_at"})
    assert said.modified_at is not None  # the entry's ``created``
