"""What the fleet says of a model, from the node to the client: a worker asks its server once
per model (Ollama's ``/api/show``; an OpenAI-compatible server's ``/v1/models`` and llama.cpp's
``/props``), keeps it in its fleet record, and the gateway answers the official ``ollama``
client's ``show()`` and the ``openai`` SDK's ``models.retrieve`` with it; in-process gateways
and workers on the simulator."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import ollama
import openai
import pytest

from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.services import wait_for

WAIT = 60
CHAT, EMBED, VISION = "llama3.2:1b", "nomic-embed-text:latest", "llava:7b"


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    """A simulator of this test only: a chat, an embedding and a vision model, all in memory
    (a node takes the jobs of the models its server holds loaded)."""
    with OllamaSimulator(SimConfig(models=[CHAT, EMBED, VISION], context_length=4096)) as server:
        for model in (CHAT, VISION):  # an empty prompt loads a model, as in Ollama
            body = {"model": model, "prompt": "", "stream": False}
            httpx.post(f"{server.url}/api/generate", json=body, timeout=WAIT).raise_for_status()
        # An embedding model has no generate: an embedding loads it.
        body = {"model": EMBED, "input": "load"}
        httpx.post(f"{server.url}/api/embed", json=body, timeout=WAIT).raise_for_status()
        yield server


def _served(url: str, count: int) -> list[str]:
    """The models the gateway lists, once ``count`` are listed with their details."""
    return wait_for(
        lambda: (
            len(m := httpx.get(f"{url}/api/tags", timeout=WAIT).json()["models"]) == count
            and all(model["details"] for model in m)
            and [model["name"] for model in m]
        ),
        timeout=WAIT,
        what=f"{count} described models in /api/tags",
    )


def test_ollama_show_and_models_retrieve_say_what_the_nodes_server_said(
    gateway_factory: Callable[..., InProcessGateway],
    sim: OllamaSimulator,
    worker_factory: WorkerFactory,
) -> None:
    url = gateway_factory().url
    worker_factory(sim.url, AVOCADO_MAX_MODELS="3")
    assert _served(url, 3) == sorted([CHAT, EMBED, VISION])
    client = ollama.Client(host=url, timeout=WAIT)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)

    chat, embed, vision = (client.show(model) for model in (CHAT, EMBED, VISION))
    retrieved = sdk.models.retrieve(CHAT)
    raw = httpx.get(f"{url}/v1/models/{CHAT}", timeout=WAIT).json()
    with pytest.raises(ollama.ResponseError) as unknown:
        client.show("qwen3:8b")
    with pytest.raises(openai.NotFoundError) as unknown_sdk:
        sdk.models.retrieve("qwen3:8b")

    assert chat.details is not None
    assert (chat.details.family, chat.details.parameter_size, chat.details.format) == (
        "llama",
        "1B",
        "gguf",
    )
    assert chat.modelinfo is not None
    assert chat.modelinfo["general.architecture"] == "llama"
    assert chat.modelinfo["llama.context_length"] == 4096
    assert chat.capabilities == ["completion", "tools"]
    assert embed.capabilities == ["embedding"]
    assert vision.capabilities == ["completion", "tools", "vision"]
    assert chat.modified_at is not None
    print(f"show({CHAT}): {chat.details.model_dump()} {chat.capabilities} {chat.modelinfo}")
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == (CHAT, "model", "avocado")
    assert raw["max_model_len"] == 4096
    assert unknown.value.status_code == 404
    assert unknown_sdk.value.code == "model_not_found"

    # Asked once per model, not every round: the worker follows the server's models on.
    rounds = len(sim.requests.to("/api/tags"))
    wait_for(
        lambda: len(sim.requests.to("/api/tags")) >= rounds + 3,
        timeout=WAIT,
        what="three more rounds of the worker",
    )
    shown = sorted(r.body["model"] for r in sim.requests.to("/api/show"))
    assert shown == sorted([CHAT, EMBED, VISION])


def test_an_openai_compatible_nodes_context_and_capabilities_reach_the_client(
    gateway_factory: Callable[..., InProcessGateway], worker_factory: WorkerFactory
) -> None:
    """llama.cpp's server: its context, modalities and tool support from ``/props``."""
    url = gateway_factory().url
    config = SimConfig(models=[CHAT], context_length=2048, openai_context_in="props")
    with OllamaSimulator(config) as sim:
        worker_factory(sim.url, AVOCADO_BACKEND="openai", AVOCADO_BACKEND_URL=f"{sim.url}/v1")
        _served(url, 1)

        shown = ollama.Client(host=url, timeout=WAIT).show(CHAT)
        raw = httpx.get(f"{url}/v1/models/{CHAT}", timeout=WAIT).json()

    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo == {"general.context_length": 2048}
    assert raw["max_model_len"] == 2048
