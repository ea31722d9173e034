"""The README's start command, as a user runs it: fleet up, jobs through RabbitMQ, fleet down."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import run_cli, service_env

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ours(run_dir: Path) -> list[str]:
    """Processes still alive whose pid file the start script wrote."""
    alive = []
    for pidfile in run_dir.glob("*.pid"):
        pid = pidfile.read_text().strip()
        if Path(f"/proc/{pid}").exists():
            alive.append(pidfile.stem)
    return alive


def _group_members(pids: list[int]) -> list[int]:
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pids and fields[0] != "Z":
            members.append(int(proc.name))
    return members


@pytest.fixture
def fleet_env(broker_url: str, key_prefix: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = service_env(
        broker_url,
        key_prefix,
        AVOCADO_RUN_DIR=str(tmp_path / "run"),
        AVOCADO_VENV=str(Path(sys.executable).parent.parent),
        AVOCADO_OLLAMA_URL=f"http://127.0.0.1:{_free_port()}",
        AVOCADO_FLOWER_PORT=str(_free_port()),
    )
    yield env
    subprocess.run([ROOT / "scripts/stop-ml-services.sh"], env=env, timeout=120, check=False)


def test_start_simulate_runs_jobs_and_stop_leaves_nothing(fleet_env: dict[str, str]) -> None:
    run_dir = Path(fleet_env["AVOCADO_RUN_DIR"])
    start = [ROOT / "scripts/start-ml-services.sh", "--simulate"]

    up = subprocess.run(start, env=fleet_env, capture_output=True, text=True, timeout=300)
    again = subprocess.run(start, env=fleet_env, capture_output=True, text=True, timeout=300)

    assert up.returncode == 0, up.stderr + up.stdout
    assert "fleet is up" in up.stdout
    assert f"http://127.0.0.1:{fleet_env['AVOCADO_FLOWER_PORT']}" in up.stdout
    assert again.returncode == 0, again.stderr
    assert "worker already running" in again.stdout
    assert sorted(_ours(run_dir)) == ["beat", "flower", "ollama-sim", "worker"]
    pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]

    gen = run_cli(fleet_env, "generate", "Why is the sky blue?", "--wait")
    summ = run_cli(fleet_env, "summarize", "--share-id", "demo-1", "--text", "Sky.", "--wait")

    assert gen.returncode == 0, gen.stderr
    assert "on worker1@" in gen.stderr
    assert summ.returncode == 0, summ.stderr
    assert summ.stdout.strip()

    down = subprocess.run(
        [ROOT / "scripts/stop-ml-services.sh"],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert down.returncode == 0, down.stderr
    assert _ours(run_dir) == []
    assert _group_members(pids) == []


def test_start_without_ollama_says_what_to_do(fleet_env: dict[str, str]) -> None:
    env = {**fleet_env, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin"}

    done = subprocess.run(
        [ROOT / "scripts/start-ml-services.sh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 1
    assert "no Ollama answers at" in done.stderr
    assert "--simulate" in done.stderr
    assert not list(Path(fleet_env["AVOCADO_RUN_DIR"]).glob("*.pid"))
