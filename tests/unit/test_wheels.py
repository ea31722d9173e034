"""The wheels hold the product, not its test harness: the worker's carries no fake ngrok and no
process helpers, and the simulator ships as a package of its own, with its command, that runs
with the standard library alone."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _wheel(package: str, out: Path) -> zipfile.ZipFile:
    """``uv build --wheel`` of ``python/PACKAGE``, with this venv's hatchling (no download)."""
    uv = Path(sys.executable).with_name("uv")
    args = [str(uv), "build", "--wheel", "--no-build-isolation", "--python", sys.executable]
    args += ["--out-dir", str(out), str(ROOT / "python" / package)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheels")
    return {p: _wheel(p, out / p) for p in ("ollama-worker", "simulator", "infer")}


def test_the_worker_wheel_holds_no_test_harness(wheels: dict[str, zipfile.ZipFile]) -> None:
    wheel = wheels["ollama-worker"]
    names = wheel.namelist()
    scripts = _dist_info(wheel, "entry_points.txt")

    assert "ollama_worker/tasks.py" in names
    harness = ("/testing/", "ngrok", "processes", "_sim", "avocado_sim")
    assert [n for n in names if any(h in n for h in harness)] == []
    assert "avocado-worker = ollama_worker.up:main" in scripts
    assert "avocado-fake-ngrok" not in scripts
    assert "avocado-ollama-sim" not in scripts
    assert "Requires-Dist: avocado-sim; extra == 'simulate'" in _dist_info(wheel, "METADATA")


def test_the_simulator_wheel_has_its_command_and_no_dependency(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    wheel = wheels["simulator"]
    names = wheel.namelist()

    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "avocado_sim"
    }
    assert "avocado-ollama-sim = avocado_sim.simulator:main" in _dist_info(
        wheel, "entry_points.txt"
    )
    assert "Requires-Dist" not in _dist_info(wheel, "METADATA")


def test_the_simulator_serves_from_its_wheel_alone(wheels: dict[str, zipfile.ZipFile]) -> None:
    """No site-packages (``-S``), only the wheel on the path: what a producer's tests install."""
    wheel = wheels["simulator"].filename
    probe = (
        "import json, sys, urllib.request\n"
        f"sys.path.insert(0, {wheel!r})\n"
        "import avocado_sim\n"
        "with avocado_sim.OllamaSimulator() as sim:\n"
        "    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "    tags = json.load(opener.open(sim.url + '/api/tags', timeout=5))\n"
        "print(json.dumps([avocado_sim.__file__, [m['name'] for m in tags['models']]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=30, check=False
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [f"{wheel}/avocado_sim/__init__.py", ["llama3.2:1b"]]


def test_the_gateway_wheel_ships_its_web_page(wheels: dict[str, zipfile.ZipFile]) -> None:
    page = {f"avocado_infer/ui/{name}" for name in ("index.html", "app.js", "style.css")}
    assert page <= set(wheels["infer"].namelist())
