"""An embedding job's texts sent to the server in batches it takes, and its vectors as Ollama
gives them: of length 1 (llama-cpp-python's server does not scale them), cut to the
``dimensions`` asked for (the first ones, scaled to length 1 again)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from avocado_shared.contracts import EmbedRequest, Usage
from ollama_worker.backends import Backend
from ollama_worker.inference import BackendRejected, Embeddings

__all__ = ["embed_texts", "fit"]

# How far from 1 a length may be and count as 1 (servers round their floats).
_UNIT = 1e-6


def embed_texts(client: Backend, model: str, job: EmbedRequest, batch_size: int) -> Embeddings:
    """The vectors of all ``job``'s texts, ``batch_size`` texts a request; a failed batch
    fails the attempt (a retry embeds them all again: vectors are cheap next to a lost job)."""
    texts = job.texts
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        got = client.embed(
            model,
            batch,
            dimensions=job.dimensions,
            truncate=job.truncate,
            options=job.options,
            keep_alive=job.keep_alive,
        )
        if len(got.vectors) != len(batch):
            raise BackendRejected(
                f"the server answered {len(got.vectors)} vectors for {len(batch)} texts"
            )
        parts.append(got)
    vectors = [fit(vector, job.dimensions) for part in parts for vector in part.vectors]
    return Embeddings(vectors, Usage.total([part.usage for part in parts]))


def fit(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """``vector`` cut to ``dimensions`` (if a server sent it whole; a shorter one stays whole,
    as Ollama gives it) and scaled to length 1."""
    cut = list(vector[:dimensions] if dimensions is not None else vector)
    norm = math.sqrt(sum(x * x for x in cut))
    if norm == 0 or math.isclose(norm, 1.0, abs_tol=_UNIT):
        return cut  # a vector of length 1 (most servers') is passed as it came
    return [x / norm for x in cut]
