"""An embedding job's texts on both backends, against the simulator: in batches, in order, cut
to the dimensions asked for, failures mapped to their kind; and the vectors the simulator gives
(the same text, the same vector, of length 1)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from avocado_shared.contracts import EmbedRequest
from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.backends import Backend
from ollama_worker.embedding import embed_texts, fit
from ollama_worker.errors import PermanentError, TransientError
from ollama_worker.inference import ModelNotFound
from ollama_worker.ollama import OllamaClient
from ollama_worker.openai_backend import OpenAIClient

MODEL = "all-minilm"
TEXTS = ["one avocado", "two ripe avocados", "a spicy sauce", "the quiet harbour", "toast"]


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=["llama3.2:1b", MODEL], context_length=8)) as server:
        yield server


@pytest.fixture(params=["ollama", "openai"])
def client(request: pytest.FixtureRequest, sim: OllamaSimulator) -> Iterator[Backend]:
    sim.clear()
    sim.config.fail_first = 0
    made: Backend = (
        OllamaClient(sim.url, read_timeout=5)
        if request.param == "ollama"
        else OpenAIClient(f"{sim.url}/v1", read_timeout=5)
    )
    with made:
        yield made


def _job(**fields: object) -> EmbedRequest:
    return EmbedRequest.model_validate({"input": TEXTS, "model": MODEL, **fields})


def test_a_list_goes_in_batches_and_comes_back_in_order(
    sim: OllamaSimulator, client: Backend
) -> None:
    done = embed_texts(client, MODEL, _job(), batch_size=2)

    whole = embed_texts(client, MODEL, _job(), batch_size=len(TEXTS))
    assert done.vectors == whole.vectors
    assert len(done.vectors) == len(TEXTS)
    assert len(set(map(tuple, done.vectors))) == len(TEXTS)  # each text its own vector
    assert done.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-6) for v in done.vectors)
    paths = ("/api/embed", "/v1/embeddings")
    sent = [r.body["input"] for r in sim.requests if r.path in paths]
    assert sent[:3] == [TEXTS[0:2], TEXTS[2:4], TEXTS[4:5]]


def test_dimensions_are_cut_and_scaled_to_length_one(client: Backend) -> None:
    done = embed_texts(client, MODEL, _job(dimensions=5), batch_size=64)

    assert {len(v) for v in done.vectors} == {5}
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-6) for v in done.vectors)


def test_a_model_not_served_is_permanent(client: Backend) -> None:
    with pytest.raises(ModelNotFound):
        embed_texts(client, "nomic-embed-text", _job(), batch_size=64)


def test_a_busy_server_is_transient(sim: OllamaSimulator, client: Backend) -> None:
    sim.config.fail_first, sim.config.fail_status = 1, 503
    with pytest.raises(TransientError):
        embed_texts(client, MODEL, _job(), batch_size=64)


def test_a_text_over_the_context_that_may_not_be_cut_is_permanent(sim: OllamaSimulator) -> None:
    long = " ".join(["word"] * 20)  # over the simulator's context of 8
    with OllamaClient(sim.url) as client, pytest.raises(PermanentError) as refused:
        embed_texts(client, MODEL, _job(input=long, truncate=False), batch_size=64)
    assert "exceeds the context length" in str(refused.value)


def test_fit_cuts_and_scales_to_length_one() -> None:
    assert fit([3.0, 4.0], None) == [0.6, 0.8]
    assert fit([0.6, 0.8, 0.0], 2) == pytest.approx([0.6, 0.8])
    assert fit([1.0, 0.0], None) == [1.0, 0.0]  # already of length 1: as it came
    assert fit([3.0, 4.0], 3) == [0.6, 0.8]  # more than the model has: all it has, as Ollama


def test_the_simulators_vectors_are_the_same_for_the_same_text(sim: OllamaSimulator) -> None:
    with OllamaClient(sim.url) as client:
        first = client.embed(MODEL, ["a text", "another"]).vectors
        again = client.embed(MODEL, ["a text"]).vectors
    assert again[0] == first[0] != first[1]
    assert len(first[0]) == 384  # a MiniLM's
