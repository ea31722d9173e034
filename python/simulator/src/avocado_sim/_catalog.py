"""Fake model metadata shaped like Ollama's /api/tags, /api/show and /api/ps.

Values are derived from the model name alone, so two simulators agree and a
test can predict sizes, digests and the architecture of any name.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import formatdate
from functools import lru_cache
from typing import Any

__all__ = [
    "DEFAULT_KEEP_ALIVE_S",
    "ModelCard",
    "capabilities",
    "card_for",
    "http_date",
    "is_embedding",
    "is_valid_name",
    "keep_alive_seconds",
    "local_iso",
    "normalize",
    "ps_entry",
    "show_body",
    "tags_entry",
    "utc_timestamp",
]

DEFAULT_KEEP_ALIVE_S = 300.0
_FOREVER_S = 292 * 365 * 24 * 3600.0  # Go's math.MaxInt64 nanoseconds, roughly
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_NAME = re.compile(rf"^(?:{_PART}/){{0,2}}{_PART}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,79}})?$")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bm])(?![a-z])")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_ARCH: tuple[tuple[str, str], ...] = (
    ("qwen3", "qwen3"),
    ("qwen", "qwen2"),
    ("gemma3", "gemma3"),
    ("gemma", "gemma2"),
    ("phi", "phi3"),
)
_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_PARAMETERS = "\n".join(f'{"stop":<30} "{s}"' for s in _STOPS)


@dataclass(frozen=True)
class ModelCard:
    """Everything the simulator reports about one model name."""

    name: str
    family: str
    parameter_size: str
    parameter_count: int
    size: int
    digest: str
    layers: tuple[tuple[str, int], ...]  # (sha256 hex, size) in pull order

    @property
    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": "Q4_K_M",
        }


def is_embedding(name: str) -> bool:
    """Whether the simulator serves ``name`` as an embedding model (it embeds, and has no
    chat): a name with "embed" or "minilm" in it, or of the bge, e5 or gte families."""
    base = normalize(name).rsplit("/", 1)[-1]
    return "embed" in base or "minilm" in base or base.startswith(("bge", "e5", "gte"))


def is_valid_name(name: object) -> bool:
    """Whether Ollama would accept the string as a model reference."""
    return isinstance(name, str) and bool(_NAME.match(name.strip()))


@lru_cache(maxsize=1024)
def normalize(name: str) -> str:
    """Canonical short name: lower case, library prefix dropped, ':latest' added."""
    n = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "library/"):
        if n.startswith(prefix):
            n = n[len(prefix) :]
    if ":" not in n.rsplit("/", 1)[-1]:
        n += ":latest"
    return n


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@lru_cache(maxsize=1024)
def card_for(name: str) -> ModelCard:
    """The metadata of a normalized model name."""
    base, _, tag = name.rpartition(":")
    family = next((arch for prefix, arch in _ARCH if base.startswith(prefix)), "llama")
    match = _SIZE.search(tag) or _SIZE.search(base.rsplit("/", 1)[-1])
    count = 3_210_000_000
    label = "3.2B"
    if match:
        value, unit = float(match.group(1)), match.group(2)
        count = int(value * (1e9 if unit == "b" else 1e6))
        label = f"{value:g}{unit.upper()}"
    weights = int(count * 0.6)  # Q4_K_M is about 4.8 bits a parameter
    layers = (
        (_sha("model:" + name), weights),
        (_sha("template:" + name), 1429),
        (_sha("license:" + name), 7711),
        (_sha("params:" + name), 96),
        (_sha("config:" + name), 561),
    )
    return ModelCard(
        name=name,
        family=family,
        parameter_size=label,
        parameter_count=count,
        size=sum(size for _, size in layers),
        digest=_sha("manifest:" + name),
        layers=layers,
    )


def tags_entry(card: ModelCard, modified_at: str) -> dict[str, Any]:
    return {
        "name": card.name,
        "model": card.name,
        "modified_at": modified_at,
        "size": card.size,
        "digest": card.digest,
        "details": card.details,
    }


def ps_entry(card: ModelCard, expires_at: str, context_length: int) -> dict[str, Any]:
    return {
        "name": card.name,
        "model": card.name,
        "size": card.size,
        "digest": card.digest,
        "details": card.details,
        "expires_at": expires_at,
        "size_vram": card.size,
        "context_length": context_length,
    }


# Name parts of the models Ollama's library serves for embeddings only, and of those that see.
_VISION = ("llava", "vision", "-vl", "moondream")


def capabilities(name: str) -> list[str]:
    """What Ollama's ``/api/show`` says a model can do, from its name alone: an embedding
    model (``nomic-embed-text``) embeds and nothing else; a chat model completes and calls
    tools, and a vision model (``llava``, ``llama3.2-vision``) also sees."""
    if is_embedding(name):
        return ["embedding"]
    base = name.rsplit("/", 1)[-1].lower()
    return ["completion", "tools", *(["vision"] if any(p in base for p in _VISION) else [])]


def show_body(card: ModelCard, context_length: int, modified_at: str) -> dict[str, Any]:
    arch = card.family
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {card.name}\n\n"
        f"FROM /root/.ollama/models/blobs/sha256-{card.layers[0][0]}\n"
        f'TEMPLATE """{_TEMPLATE}"""\n'
        + "".join(f"PARAMETER stop {s}\n" for s in _STOPS)
        + 'LICENSE """Simulated model: no weights, no licence terms."""\n'
    )
    return {
        "license": "Simulated model: no weights, no licence terms.",
        "modelfile": modelfile,
        "parameters": _PARAMETERS,
        "template": _TEMPLATE,
        "details": card.details,
        "model_info": {
            "general.architecture": arch,
            "general.basename": card.name.split(":", 1)[0].rsplit("/", 1)[-1],
            "general.file_type": 15,
            "general.parameter_count": card.parameter_count,
            "general.quantization_version": 2,
            f"{arch}.attention.head_count": 32,
            f"{arch}.attention.head_count_kv": 8,
            f"{arch}.block_count": 28,
            f"{arch}.context_length": context_length,
            f"{arch}.embedding_length": 3072,
            f"{arch}.feed_forward_length": 8192,
            f"{arch}.vocab_size": 128256,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.bos_token_id": 128000,
            "tokenizer.ggml.eos_token_id": 128009,
            "tokenizer.ggml.tokens": [],
        },
        "capabilities": capabilities(card.name),
        "modified_at": modified_at,
    }


def keep_alive_seconds(value: object) -> float:
    """Seconds a model stays loaded; negative values mean forever, like Ollama."""
    if isinstance(value, bool) or value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, (int, float)):
        return _FOREVER_S if value < 0 else float(value)
    if not isinstance(value, str) or not value.strip():
        return DEFAULT_KEEP_ALIVE_S
    text = value.strip()
    negative = text.startswith("-")
    text = text.lstrip("+-")
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return DEFAULT_KEEP_ALIVE_S
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    return _FOREVER_S if negative and seconds > 0 else seconds


def utc_timestamp() -> str:
    """Go's RFC 3339 UTC time with nanoseconds, as in every 'created_at'."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def local_iso(epoch: float) -> str:
    """Local time with its offset, as Ollama writes 'modified_at' and 'expires_at'."""
    try:
        return datetime.fromtimestamp(epoch).astimezone().isoformat()
    except (OverflowError, OSError, ValueError):
        return (datetime.now().astimezone() + timedelta(days=365 * 290)).isoformat()


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
