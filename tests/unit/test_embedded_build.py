"""The embedded engine is built with only what the embedded server loads (scripts/lib.sh,
scripts/llama-cpp-python.cmake): libllama and ggml, neither the multimodal library nor
llama.cpp's common library, and every clone on a machine shares one build in pip's cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parents[2]


def _lib_sh(function: str, root: Path = ROOT) -> str:
    """What a function of scripts/lib.sh prints, sourced from ``root``'s copy."""
    script = f'source "{root}/scripts/lib.sh"; {function}'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_installed_engine_holds_libllama_and_ggml_alone() -> None:
    libraries = {
        p.name.split(".so")[0] for p in (Path(llama_cpp.__file__).parent / "lib").iterdir()
    }

    assert libraries == {"libllama", "libggml", "libggml-base", "libggml-cpu"}


def test_the_flags_turn_the_multimodal_and_common_libraries_off() -> None:
    flags = _lib_sh("llama_cmake_args").split()
    include = next(f for f in flags if f.startswith("-DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE="))

    assert "-DLLAVA_BUILD=OFF" in flags
    assert "set(LLAMA_BUILD_COMMON OFF" in Path(include.split("=", 1)[1]).read_text()


def test_every_clone_shares_one_build_key(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    for name in ("lib.sh", "llama-cpp-python.cmake"):
        (clone / "scripts" / name).write_bytes((ROOT / "scripts" / name).read_bytes())

    assert _lib_sh("llama_build_key", clone) == _lib_sh("llama_build_key")
    assert _lib_sh("llama_cmake_args", clone) != _lib_sh("llama_cmake_args")
