"""Notebook mode: ``avocado-worker up`` and ``notebooks/colab_worker.ipynb``, top to bottom,
against the simulators: ``ollama`` is the Ollama simulator under that name (so ``ollama
serve`` really runs), the tunnel is the fake ngrok agent, the fleet is the real one."""

from __future__ import annotations

import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from avocado_shared import Producer
from avocado_shared.discovery import Announcement, EndpointEvent, EndpointWatcher
from avocado_sim import OllamaSimulator, SimConfig
from tests.fake_ngrok import fake_ngrok_path
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


@contextmanager
def _up(
    env: dict[str, str], *args: str, sigint_ignored: bool = False
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``avocado-worker up ARGS`` as a user starts it, its output collected line by line;
    ``sigint_ignored``: as a script's background job starts, SIGINT ignored (``trap '' INT``)."""
    command = [str(VENV_BIN / "avocado-worker"), "up", *args]
    if sigint_ignored:
        command = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *command]
    process = subprocess.Popen(
        command,
        env=env,
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


def _refused(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``avocado-worker up ARGS`` run to its end, for a start it must refuse."""
    return subprocess.run(
        [str(VENV_BIN / "avocado-worker"), "up", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


@pytest.fixture
def up_process(up_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Started with SIGINT ignored, as from a script's ``&``: an interrupt must still stop it
    (seen: a suite run from such a job waited 60 s on each ``up``)."""
    with _up(up_env, "--model", MODEL, "--tunnel", "--beat", sigint_ignored=True) as started:
        yield started


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

    done = _refused(up_env)

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


def test_up_on_an_openai_compatible_server_starts_no_ollama_and_serves_through_v1(
    up_env: dict[str, str],
    producer: Producer,
    events: tuple[EndpointWatcher, list[Announcement]],
) -> None:
    watcher, seen = events
    sid = up_env["AVOCADO_SERVICE_ID"]
    with OllamaSimulator(SimConfig(models=[MODEL])) as server:
        args = ["--backend", "openai", "--backend-url", f"{server.url}/v1", "--tunnel"]
        missing = _refused(up_env, *args, "--model", "not-served:1b")
        assert missing.returncode == 2
        assert "does not serve not-served:1b (it serves: qwen2.5:0.5b)" in missing.stderr
        assert "Traceback" not in missing.stderr

        with _up(up_env, *args) as (process, lines):
            wait_for(lambda: any("joined the fleet" in x for x in lines), WAIT, "the node to join")
            assert watcher.wait_until(lambda live: sid in live, timeout=WAIT)
            assert watcher.live()[sid].backend == "openai"
            assert watcher.live()[sid].models == [MODEL]
            result = producer.generate("Hello from the test.", model=MODEL).get(timeout=WAIT)
            assert result.worker == f"ollama@{sid}"

            process.send_signal(signal.SIGINT)

            assert process.wait(timeout=WAIT) == 0
        output = "".join(lines)
        assert "starting ollama serve" not in output
        assert "OpenAI-compatible server is public at http://" in output
        assert server.requests.to("/v1/chat/completions")
        assert not server.requests.to("/api/pull")
        assert not [r for r in server.requests if r.path.startswith("/api/")], "no Ollama API"
    assert watcher.wait_until(lambda _: EndpointEvent.REMOVED in _events(seen, sid), WAIT)
    assert _ours(up_env) == []
    assert PASSWORD not in output
