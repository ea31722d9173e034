"""llama-cpp-python's OpenAI-compatible server with llama.cpp's extra buffer types off.

On a CPU with AMX (Intel Sapphire Rapids and later), llama.cpp moves a quantized model's
weights into an AMX buffer, and its AMX matrix product crashes the server (a segmentation
fault in ``ggml_backend_amx_mul_mat``, llama.cpp issue 20824) at the first token of SmolLM2's
Q4_1 file. llama-cpp-python 0.3.36 offers no setting for the model parameter that turns them
off (``use_extra_bufts``), so its default parameters are patched before the server starts:
the weights stay in plain CPU buffers, which every x86 CPU computes correctly.
``python -m ollama_worker.overrides.llama_server ARGS`` takes the server's own arguments.
"""

from __future__ import annotations

import runpy
from typing import Any

__all__ = ["main", "plain_buffers"]


def plain_buffers() -> None:
    """Make every model this process loads keep its weights in plain CPU buffers."""
    from llama_cpp import llama_cpp

    default = llama_cpp.llama_model_default_params

    def params() -> Any:
        made = default()
        made.use_extra_bufts = False
        return made

    llama_cpp.llama_model_default_params = params


def main() -> None:
    """Run ``python -m llama_cpp.server`` with this process's arguments, patched."""
    plain_buffers()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
