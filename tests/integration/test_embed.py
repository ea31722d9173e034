"""Embeddings through the real queue, on the simulator: ``Producer.embed`` and the results it
keeps, a long list in batches, an item's embedding by its share id, a node that serves a chat
model and an embedding model at once; and through the gateway, the official ``ollama`` client
(``embed``, ``embeddings``), the ``openai`` SDK (``embeddings.create``, floats and base64) and
LangChain's ``OllamaEmbeddings``, each reading the vectors the simulator gives straight."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import ollama
import pytest
import redis
from langchain_ollama import OllamaEmbeddings

from avocado_shared import Producer, Settings
from avocado_shared.contracts import EmbedResult, JobKind
from avocado_shared.fleet import WorkerRegistry
from avocado_shared.store import JobStatus, job_key
from avocado_shared.topology import EMBED_QUEUE, EMBED_TASK, ML_EXCHANGE
from avocado_sim import OllamaSimulator, SimConfig
from tests.gateway_clients import Fleet
from tests.inprocess import InProcessWorker
from tests.services import REDIS_URL, VENV_BIN, run_cli, service_env, wait_for

WAIT = 90
CHAT = "llama3.2:1b"
EMBEDDING = "all-minilm"
TEXTS = ["Avocados ripen after picking.", "The harbour is quiet tonight.", "Spicy guacamole."]
BATCH = 64  # the worker's AVOCADO_EMBED_BATCH_SIZE


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    """This module's simulated Ollama (conftest's ``worker`` runs on it): a chat model and an
    embedding model."""
    with OllamaSimulator(SimConfig(models=[CHAT, EMBEDDING])) as server:
        yield server


@pytest.fixture(autouse=True)
def _quick_sim(sim: OllamaSimulator) -> None:
    """Each test starts with the simulator's request log cleared and no delay."""
    sim.clear()
    sim.config.latency_ms = 0


def straight(sim: OllamaSimulator, texts: list[str], **fields: object) -> list[list[float]]:
    """The vectors the server gives a client that asks it straight."""
    body = {"model": EMBEDDING, "input": texts, **fields}
    answer = httpx.post(f"{sim.url}/api/embed", json=body, timeout=WAIT)
    answer.raise_for_status()
    vectors: list[list[float]] = answer.json()["embeddings"]
    return vectors


def test_a_node_serves_its_chat_model_and_its_embedding_model_at_once(
    worker: InProcessWorker, settings: Settings
) -> None:
    registry = WorkerRegistry(redis.Redis.from_url(REDIS_URL), settings.key_prefix)
    try:
        wait_for(
            lambda: {f"{CHAT}", f"{EMBEDDING}:latest"} <= registry.served(),
            timeout=WAIT,
            what="the worker to serve both models",
        )
    finally:
        registry.close()


def test_a_list_is_one_job_sent_in_batches_and_stored(
    worker: InProcessWorker, producer: Producer, sim: OllamaSimulator
) -> None:
    texts = [f"{text} ({n})" for n in range(BATCH // len(TEXTS) + 1) for text in TEXTS]
    expected = straight(sim, texts)
    sim.clear()

    handle = producer.embed(texts, model=EMBEDDING)
    result = handle.get(timeout=WAIT)

    assert isinstance(result, EmbedResult)
    assert result.embeddings == expected
    assert result.prompt_tokens == sum(len(t.split()) for t in texts)
    sent = [r.body["input"] for r in sim.requests.to("/api/embed")]
    assert sent == [texts[:BATCH], texts[BATCH:]]
    row = producer.results.get(handle.id)
    assert row is not None
    assert (row.status, row.task_type) == (JobStatus.SUCCESS, "embed")
    assert row.model == f"{EMBEDDING}:latest"  # as the node's server names it
    assert row.result is not None
    assert row.result["embeddings"] == expected


def test_an_items_embedding_is_one_job_at_a_time_and_found_by_its_share_id(
    worker: InProcessWorker, producer: Producer, sim: OllamaSimulator
) -> None:
    sim.config.latency_ms = 500  # the first job is still queued or running when sent again
    share_id = "item-embed-1"

    first = producer.embed(TEXTS[0], share_id=share_id)
    again = producer.embed(TEXTS[0], share_id=share_id)
    result = first.get(timeout=WAIT)

    assert again.id == first.id
    assert isinstance(result, EmbedResult)
    assert result.share_id == share_id
    row = producer.results.get_by_key(job_key(JobKind.EMBED, "", share_id))
    assert row is not None
    assert (row.job_id, row.share_id) == (first.id, share_id)
    assert len(sim.requests.to("/api/embed")) == 1


def test_an_embedding_published_to_ml_embed_goes_to_its_models_queue(
    worker: InProcessWorker, producer: Producer, sim: OllamaSimulator
) -> None:
    job_id = str(uuid.uuid4())
    request = {"input": TEXTS, "model": EMBEDDING}

    # As a plain AMQP producer publishes it: to the entry queue, no lock, no model queue.
    producer.app.send_task(
        EMBED_TASK,
        kwargs={"request": request},
        task_id=job_id,
        exchange=ML_EXCHANGE.name,
        routing_key=EMBED_QUEUE,
    )
    result = producer.handle(job_id).get(timeout=WAIT)

    assert isinstance(result, EmbedResult)
    assert result.embeddings == straight(sim, TEXTS)
    assert f"job {job_id} forwarded to ml.model.{EMBEDDING}:latest.batch" in worker.log_text()


def test_avocado_embed_prints_the_vectors_of_its_arguments_or_of_stdin_lines(
    worker: InProcessWorker, broker_url: str, key_prefix: str, sim: OllamaSimulator
) -> None:
    env = service_env(broker_url, key_prefix)

    given = run_cli(env, "embed", *TEXTS[:2], "--wait")
    piped = subprocess.run(
        [str(VENV_BIN / "avocado"), "embed", "--wait", "--json"],
        input=f"{TEXTS[0]}\n\n{TEXTS[1]}\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )

    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout) == straight(sim, TEXTS[:2])
    assert "-- embed" in given.stderr  # what it cost, on stderr
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["embeddings"] == straight(sim, TEXTS[:2])


def test_dimensions_cut_each_vector_to_length_one(
    worker: InProcessWorker, producer: Producer, sim: OllamaSimulator
) -> None:
    result = producer.embed(TEXTS, dimensions=16).get(timeout=WAIT)

    assert isinstance(result, EmbedResult)
    assert [len(v) for v in result.embeddings] == [16] * len(TEXTS)
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-5) for v in result.embeddings)
    assert result.embeddings == straight(sim, TEXTS, dimensions=16)


def test_the_ollama_client_embeds_through_the_gateway(fleet: Fleet, sim: OllamaSimulator) -> None:
    expected = straight(sim, TEXTS)

    answer = fleet.ollama().embed(model=EMBEDDING, input=TEXTS)
    legacy = fleet.ollama().embeddings(model=EMBEDDING, prompt=TEXTS[1])

    assert [list(v) for v in answer.embeddings] == expected
    assert answer.model == EMBEDDING
    assert answer.prompt_eval_count == sum(len(t.split()) for t in TEXTS)
    assert list(legacy.embedding) == expected[1]
    assert len(fleet.job_ids) == 2


@pytest.mark.parametrize(
    "encoding", [None, "float", "base64"], ids=["sdk-default", "float", "base64"]
)
def test_the_openai_sdk_embeds_through_the_gateway(
    fleet: Fleet, sim: OllamaSimulator, encoding: str | None
) -> None:
    expected = straight(sim, TEXTS)
    sdk = fleet.openai()

    if encoding is None:  # the SDK asks for base64 and decodes it itself
        answer = sdk.embeddings.create(model=EMBEDDING, input=TEXTS)
    else:
        answer = sdk.embeddings.create(
            model=EMBEDDING,
            input=TEXTS,
            encoding_format=encoding,  # type: ignore[arg-type]
        )

    assert [d.index for d in answer.data] == [0, 1, 2]
    if encoding == "float":
        assert [d.embedding for d in answer.data] == expected
    else:  # float32 on the wire
        raw = [d.embedding for d in answer.data]
        got = [_floats(v) if isinstance(v, str) else v for v in raw]
        assert encoding is None or all(isinstance(v, str) for v in raw)
        for vector, want in zip(got, expected, strict=True):
            assert vector == pytest.approx(want, abs=1e-6)
    assert answer.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)


def _floats(encoded: str) -> list[float]:
    """OpenAI's base64 vector: little-endian float32."""
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_langchains_ollama_embeddings_through_the_gateway(
    fleet: Fleet, sim: OllamaSimulator
) -> None:
    expected = straight(sim, TEXTS)
    embeddings = OllamaEmbeddings(model=EMBEDDING, base_url=fleet.gateway.url)

    assert embeddings.embed_documents(TEXTS) == expected
    assert embeddings.embed_query(TEXTS[0]) == expected[0]


def test_an_embedding_model_no_node_serves_is_a_404(fleet: Fleet) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        fleet.ollama().embed(model="nomic-embed-text", input=TEXTS)
    assert refused.value.status_code == 404
    assert "no live node serves it" in refused.value.error
