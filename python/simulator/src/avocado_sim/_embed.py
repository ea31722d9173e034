"""The simulator's embeddings: Ollama's ``/api/embed`` and older ``/api/embeddings``, and the
OpenAI-compatible ``/v1/embeddings`` (floats or base64), in each API's shapes and errors.

A vector is a pure function of the model and the text (the same text, the same vector; texts
that mean the same are not closer here than any others), of length 1, with the model's
dimensions: 384 for a MiniLM, 768 for other names. A token is a word, as elsewhere in the
simulator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from avocado_sim import _catalog as catalog
from avocado_sim._openai import _INJECTED, _error, request_body
from avocado_sim._text import count_words

if TYPE_CHECKING:
    from avocado_sim._http import _Handler

__all__ = ["ROUTES", "dimensions_of", "vector"]

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dimensions_of(model: str) -> int:
    """The length of ``model``'s vectors."""
    return 384 if "minilm" in catalog.normalize(model) else 768


def vector(model: str, text: str, dimensions: int | None = None) -> list[float]:
    """``text``'s vector under ``model``: deterministic, of length 1; the first
    ``dimensions`` of it, scaled to length 1 again, when asked for fewer."""
    size = dimensions_of(model)
    raw: list[float] = []
    seed = f"{catalog.normalize(model)}\0{text}".encode()
    digest = hashlib.blake2b(seed, digest_size=64).digest()
    while len(raw) < size:
        raw += [(byte - 127.5) / 127.5 for byte in digest]
        digest = hashlib.blake2b(digest, digest_size=64).digest()
    raw = raw[: min(size, dimensions or size)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 7) for x in raw]


def _texts(value: Any) -> list[str] | None:
    """The input as a list of texts; None when it is neither a text nor a list of texts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value)
    return None


def _embedded(
    h: _Handler, model: str, texts: list[str], truncate: bool, dimensions: int | None
) -> tuple[list[list[float]], int] | str:
    """The vectors of ``texts`` and their tokens, paced like a generation's prompt; or the
    error of a text over the context that may not be cut."""
    state = h.server.state
    limit = state.config.context_length
    tokens = 0
    for text in texts:
        words = count_words(text)
        if words > limit and not truncate:
            return "the input length exceeds the context length"
        tokens += min(words, limit)
    if state.load(model, limit):
        h._pause(state.config.load_ms / 1000)
    h._pause(state.latency_s())
    return [vector(model, t, dimensions) for t in texts], tokens


def _served(h: _Handler, model: Any) -> str | None:
    """Ollama's error for a missing, malformed or absent model; None when it is served."""
    if not isinstance(model, str) or not model.strip():
        return "model is required"
    if not catalog.is_valid_name(model):
        return "invalid model name"
    if not h.server.state.has_model(model):
        return f"model '{model}' not found"
    return None


def _ollama(h: _Handler, raw: bytes, started: int, *, legacy: bool) -> None:
    from avocado_sim._http import _failure, _json_error

    body, err = _json_error(raw, "EmbeddingRequest" if legacy else "EmbedRequest")
    if err is not None:
        return h._error(400, err)
    model = body.get("model")
    missing = _served(h, model)
    if missing is not None:
        return h._error(404 if missing.endswith("not found") else 400, missing)
    if legacy:
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else None
        if prompt is None or prompt == "":  # Ollama answers an empty prompt with no vector
            return h._json(200, {"embedding": []})
    else:
        texts = _texts(body.get("input"))
    dims = body.get("dimensions")
    if texts is None or (dims is not None and not (isinstance(dims, int) and dims > 0)):
        return h._error(400, "invalid input type" if texts is None else "invalid dimensions")

    def run() -> None:
        assert texts is not None
        got = _embedded(h, model, texts, body.get("truncate") is not False, dims)
        if isinstance(got, str):
            return h._error(400, got)
        vectors, tokens = got
        if legacy:
            return h._json(200, {"embedding": vectors[0]})
        took = max(time.perf_counter_ns() - started, 1)
        answer = {
            "model": model,
            "embeddings": vectors,
            "total_duration": took,
            "load_duration": 1,
            "prompt_eval_count": tokens,
        }
        return h._json(200, answer)

    def fail(status: int) -> None:
        payload, ctype = _failure(status, model, "embeddings")
        h._send(status, payload, ctype, h._retry_after(status))

    return h._in_slot(run, fail)


def ollama_embed(h: _Handler, raw: bytes, started: int) -> None:
    _ollama(h, raw, started, legacy=False)


def ollama_embeddings(h: _Handler, raw: bytes, started: int) -> None:
    _ollama(h, raw, started, legacy=True)


def openai_embeddings(h: _Handler, raw: bytes, started: int) -> None:
    """OpenAI's ``/v1/embeddings``: ``input`` a text or a list of texts, ``encoding_format``
    float or base64 (little-endian float32, as OpenAI sends), ``dimensions``."""
    body = request_body(h, raw)
    if body is None:
        return None
    model: str = body["model"]
    texts = _texts(body.get("input"))
    encoding = body.get("encoding_format", "float")
    dims = body.get("dimensions")
    if texts is None or not texts or any(not t for t in texts):
        return _error(h, 400, "'input' must be a non-empty string or a list of non-empty strings")
    if encoding not in ("float", "base64"):
        return _error(h, 400, "'encoding_format' must be 'float' or 'base64'")
    if dims is not None and not (isinstance(dims, int) and 0 < dims <= dimensions_of(model)):
        return _error(h, 400, f"'dimensions' must be between 1 and {dimensions_of(model)}")
    if not h.server.state.has_model(model):
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(h, 404, message, "model_not_found")

    def run() -> None:
        assert texts is not None
        got = _embedded(h, model, texts, True, dims)
        assert not isinstance(got, str)  # texts are cut to the context here
        vectors, tokens = got
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, encoding)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": model, "usage": usage}
        h._send(200, _encode(answer).encode(), "application/json")

    def fail(status: int) -> None:
        message, code = _INJECTED.get(status, (f"injected failure {status}", None))
        _error(h, status, message, code)

    return h._in_slot(run, fail)


def _encoded(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


ROUTES: dict[str, dict[str, Callable[[_Handler, bytes, int], None]]] = {
    "/api/embed": {"POST": ollama_embed},
    "/api/embeddings": {"POST": ollama_embeddings},
    "/v1/embeddings": {"POST": openai_embeddings},
}
