"""Images through the gateway and the real queue, with the clients people use: the official
``ollama`` client and the ``openai`` SDK, on workers of either backend in front of the
simulator, which says how many images it saw; and Ollama's model-management calls, which a
fleet refuses in Ollama's shape."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import ollama
import pytest

from avocado_shared import Producer
from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import WorkerFactory
from tests.gateway import InProcessGateway
from tests.gateway_clients import Fleet
from tests.inprocess import InProcessWorker

WAIT = 90
MODEL = "llama3.2:1b"
SEEING = "qwen3:0.6b"  # the OpenAI-compatible server's: its jobs go to its worker alone
PICTURE = b"\x89PNG\r\n\x1a\n" + bytes(32)
PNG = base64.b64encode(PICTURE).decode()


@pytest.fixture
def fleet(
    worker: InProcessWorker, producer: Producer, gateway_factory: Callable[..., InProcessGateway]
) -> Fleet:
    """The gateway, and the module's worker on the simulator's Ollama API."""
    return Fleet(gateway_factory(), producer, WAIT)


@pytest.fixture
def openai_fleet(
    producer: Producer,
    worker_factory: WorkerFactory,
    gateway_factory: Callable[..., InProcessGateway],
) -> Iterator[tuple[Fleet, OllamaSimulator]]:
    """The gateway, and a worker (a subprocess: the module's runs in this one) on a
    simulator's OpenAI-compatible API."""
    with OllamaSimulator(SimConfig(models=[SEEING])) as sim:
        worker_factory.process(
            sim.url,
            AVOCADO_BACKEND="openai",
            AVOCADO_BACKEND_URL=f"{sim.url}/v1",
            AVOCADO_DEFAULT_MODEL=SEEING,
        )
        yield Fleet(gateway_factory(), producer, WAIT), sim


def test_the_ollama_client_shows_images_to_an_ollama_backend(
    fleet: Fleet, fresh_sim: OllamaSimulator
) -> None:
    client = fleet.ollama()
    # The client takes bytes (and paths) and sends base64, as Ollama's API wants.
    said = client.chat(
        model=MODEL, messages=[{"role": "user", "content": "What?", "images": [PICTURE, PNG]}]
    )
    *pieces, _ = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "What?", "images": [PICTURE]}],
        stream=True,
    )
    told = client.generate(model=MODEL, prompt="What?", images=[PICTURE])

    chatted, streamed, generated = (fleet.result(j) for j in fleet.job_ids)
    assert said.message.content == chatted.text
    assert chatted.text.startswith("I see 2 images. ")
    assert "".join(p.message.content or "" for p in pieces) == streamed.text
    assert streamed.text.startswith("I see 1 image. ")
    assert told.response == generated.text
    assert generated.text.startswith("I see 1 image. ")
    assert fresh_sim.requests.last("/api/generate").body["images"] == [PNG]
    assert fresh_sim.requests.last("/api/chat").body["messages"][0]["images"] == [PNG]


def test_the_openai_sdk_shows_images_to_either_backend(
    fleet: Fleet, openai_fleet: tuple[Fleet, OllamaSimulator]
) -> None:
    on_openai, sim = openai_fleet
    for each, model in ((fleet, MODEL), (on_openai, SEEING)):
        answer = each.openai().chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    ],
                }
            ],
        )
        result = each.result(answer.id.removeprefix("chatcmpl-"))
        assert answer.choices[0].message.content == result.text
        assert result.text.startswith("I see 1 image. ")
    (part,) = [
        p
        for p in sim.requests.last("/v1/chat/completions").body["messages"][0]["content"]
        if p["type"] == "image_url"
    ]
    assert part["image_url"]["url"] == f"data:image/png;base64,{PNG}"


def test_the_ollama_client_is_told_models_are_managed_on_the_nodes(fleet: Fleet) -> None:
    client = fleet.ollama()
    calls = [
        lambda: client.pull(MODEL),
        lambda: client.push(MODEL),
        lambda: client.create(model="mine", from_=MODEL),
        lambda: client.copy(MODEL, "mine"),
        lambda: client.delete(MODEL),
    ]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 403
        assert "models are managed on its nodes" in refused.value.error
