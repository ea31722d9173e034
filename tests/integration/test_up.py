"""Notebook mode: ``avocado-worker up`` and ``notebooks/colab_worker.ipynb``, top to bottom,
against the simulators: ``ollama`` is the Ollama simulator under that name (so ``ollama
serve`` really runs), the tunnel is the fake ngrok agent, the fleet is the real one."""

from __future__ import annotations

import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from avocado_shared import Producer
from avocado_shared.discovery import Announcement, EndpointEvent, EndpointWatcher
from ollama_worker.testing import fake_ngrok_path
from tests.services import VENV_BIN, free_port, service_env, wait_for

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60
MODEL = "qwen2.5:0.5b"  # not on the simulator at first: it must be pulled
TOKEN = f"ngrok-token-{uuid.uuid4().hex}"
PASSWORD = f"tunnel-pass-{uuid.uuid4().hex}"


@pytest.fixture
def up_env(broker_url: str, key_prefix: str, tmp_path: Path) -> dict[str, str]:
    """What a notebook user sets, with ``ollama`` on PATH being the simulator."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ollama").symlink_to(VENV_BIN / "avocado-ollama-sim")
    return service_env(
        broker_url,
        key_prefix,
        PATH=f"{bin_dir}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        AVOCADO_OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
        AVOCADO_SERVICE_ID=f"up-{uuid.uuid4().hex[:8]}",
        AVOCADO_DEFAULT_MODEL=MODEL,
        AVOCADO_NGROK_PATH=fake_ngrok_path(),
        NGROK_AUTHTOKEN=TOKEN,
        AVOCADO_TUNNEL_PASSWORD=PASSWORD,
        AVOCADO_NODE_TTL_S="6",
        AVOCADO_NODE_REFRESH_S="1",
        AVOCADO_ANNOUNCE_INTERVAL_S="2",
        XDG_DATA_HOME=str(tmp_path / "data"),
    )


def _ours(env: dict[str, str]) -> list[str]:
    """Processes of this node still running: worker, agent (by service id), ollama serve."""
    found = []
    for pattern in (env["AVOCADO_SERVICE_ID"], env["PATH"].split(":")[0]):
        done = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
        found += done.stdout.splitlines()
    return found


def _events(seen: list[Announcement], sid: str) -> list[EndpointEvent]:
    return [a.event for a in seen if a.service_id == sid]


@pytest.fixture
def up_process(up_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``avocado-worker up`` as a user starts it, its output collected line by line."""
    process = subprocess.Popen(
        [str(VENV_BIN / "avocado-worker"), "up", "--model", MODEL, "--tunnel", "--beat"],
        env=up_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:  # a failed test: leave the fleet as a user would
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def test_up_joins_the_fleet_and_an_interrupt_leaves_it_with_nothing_behind(
    up_env: dict[str, str],
    up_process: tuple[subprocess.Popen[str], list[str]],
    producer: Producer,
    events: tuple[EndpointWatcher, list[Announcement]],
) -> None:
    process, lines = up_process
    watcher, seen = events
    sid = up_env["AVOCADO_SERVICE_ID"]

    wait_for(lambda: any("joined the fleet" in x for x in lines), WAIT, "the node to join")
    output = "".join(lines)
    assert "starting ollama serve" in output
    assert f"pulling {MODEL}" in output
    assert "100%" in output  # the progress bar got to the end
    assert "Ollama is public at http://" in output
    assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
    result = producer.generate("Hello from the test.", model=MODEL).get(timeout=WAIT)
    assert result.worker == f"ollama@{sid}"
    assert result.model == MODEL

    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=WAIT) == 0
    assert watcher.wait_until(lambda _: EndpointEvent.REMOVED in _events(seen, sid), WAIT)
    assert _ours(up_env) == []
    assert TOKEN not in output + "".join(lines)
    assert PASSWORD not in "".join(lines)


def test_up_without_ollama_offline_says_what_to_do(up_env: dict[str, str]) -> None:
    up_env["PATH"] = f"{VENV_BIN}:/usr/bin:/bin"  # no ollama binary

    done = subprocess.run(
        [str(VENV_BIN / "avocado-worker"), "up"],
        env=up_env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )

    assert done.returncode == 2
    assert "Ollama is not installed" in done.stderr
    assert "AVOCADO_OLLAMA_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_colab_notebook_runs_top_to_bottom(
    up_env: dict[str, str],
    events: tuple[EndpointWatcher, list[Announcement]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    watcher, seen = events
    sid = up_env["AVOCADO_SERVICE_ID"]
    for name, value in up_env.items():
        monkeypatch.setenv(name, value)  # the kernel inherits them, as from a secret store
    notebook = nbformat.read(ROOT / "notebooks" / "colab_worker.ipynb", as_version=4)

    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()

    text = "\n".join(
        str(out.get("text", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert (
        "secrets found: AVOCADO_BROKER_URL, AVOCADO_REDIS_URL, AVOCADO_KEY_PREFIX, NGROK_AUTHTOKEN"
        in text
    )
    assert "public URL: http://" in text
    assert f"tokens on ollama@{sid}" in text
    assert "left the fleet" in text
    removed = [EndpointEvent.REMOVED]
    assert watcher.wait_until(lambda _: _events(seen, sid)[-1:] == removed, timeout=WAIT)
    assert EndpointEvent.CHANGED in _events(seen, sid)
    assert TOKEN not in text
    assert PASSWORD not in text
    assert _ours(up_env) == []
