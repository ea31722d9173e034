"""An embedding job's texts sent to the server in batches it takes, and its vectors cut to the
dimensions asked for, as Ollama cuts them: the first ``dimensions``, scaled to length 1."""

from __future__ import annotations

import math
from collections.abc import Sequence

from avocado_shared.contracts import EmbedRequest, Usage
from ollama_worker.backends import Backend
from ollama_worker.inference import BackendRejected, Embeddings

__all__ = ["embed_texts", "fit"]


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
    """``vector`` cut to ``dimensions`` and scaled back to length 1, for a server that sent
    it whole; ``BackendRejected`` when the model's vectors are shorter than asked for."""
    if dimensions is None or len(vector) == dimensions:
        return list(vector)
    if len(vector) < dimensions:
        raise BackendRejected(
            f"the model's vectors have {len(vector)} dimensions, fewer than the {dimensions} "
            "asked for"
        )
    cut = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in cut)) or 1.0
    return [x / norm for x in cut]
