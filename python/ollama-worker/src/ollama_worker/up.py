"""Notebook mode: one command joins this machine to the fleet, and leaves it cleanly.

``avocado-worker up [--model M] [--tunnel] [--beat]`` does what the original Colab notebook
did by hand: make sure Ollama runs (install it when missing and online, start ``ollama
serve``), pull the model with a progress bar, start a worker (which opens the tunnel and
announces it when asked), and on interrupt stop everything it started, so the
announcement is withdrawn at once instead of expiring. With ``--backend openai
--backend-url URL`` (a notebook that runs vLLM) the server is the user's: nothing is
installed, started or pulled, and the model must be one it serves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from avocado_shared.celery_config import make_celery
from avocado_shared.errors import PermanentError
from avocado_shared.registry import NodeRegistry
from ollama_worker.backends import make_backend
from ollama_worker.errors import AvocadoError
from ollama_worker.ollama import OllamaClient
from ollama_worker.serving import DEFAULT_SLOTS
from ollama_worker.settings import WorkerSettings

__all__ = ["NotebookWorker", "UpError", "main", "session_limit"]

INSTALL_SCRIPT = "https://ollama.com/install.sh"
_BAR = 30
# Colab's and Kaggle's free sessions end 12 hours after they start at the latest.
NOTEBOOK_SESSION_S = 12 * 3600.0
_PLATFORMS = (("COLAB_RELEASE_TAG", "Colab"), ("KAGGLE_KERNEL_RUN_TYPE", "Kaggle"))


class UpError(PermanentError):
    """Something the user must fix; the message says what."""


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _online() -> bool:
    try:
        httpx.head(INSTALL_SCRIPT, timeout=5.0, follow_redirects=True)
        return True
    except httpx.HTTPError:
        return False


def _wait(condition: Callable[[], bool], seconds: float, process: subprocess.Popen[bytes]) -> bool:
    """Poll until ``condition`` holds, ``process`` exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def progress_bar(out: IO[str]) -> Callable[[dict[str, Any]], None]:
    """Render Ollama's pull progress lines as one bar per layer."""
    last = {"status": ""}

    def show(chunk: dict[str, Any]) -> None:
        status = str(chunk.get("status", ""))
        total, done = chunk.get("total"), chunk.get("completed") or 0
        if status != last["status"] and last["status"]:
            out.write("\n")
        last["status"] = status
        if total:
            filled = int(_BAR * done / total)
            out.write(
                f"\r{status[:40]:<40} [{'#' * filled:<{_BAR}}] {done / total:>4.0%} "
                f"{done / 1e9:.2f}/{total / 1e9:.2f} GB"
            )
        else:
            out.write(f"\r{status}")
        out.flush()

    return show


class NotebookWorker:
    """Ollama and the model (or a running OpenAI-compatible server), a worker (and beat),
    started in order and stopped in reverse."""

    def __init__(
        self,
        model: str | None = None,
        *,
        tunnel: bool = False,
        beat: bool = False,
        concurrency: int | None = None,
        backend: Literal["ollama", "openai"] | None = None,
        backend_url: str | None = None,
        run_dir: Path | None = None,
        out: IO[str] = sys.stdout,
    ) -> None:
        """``backend`` and ``backend_url`` override AVOCADO_BACKEND(_URL) when given."""
        given: dict[str, Any] = {"backend": backend, "backend_url": backend_url}
        self.settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
        self.model = model or self.settings.default_model
        self.tunnel = tunnel
        self.beat = beat
        self.concurrency = concurrency
        self.out = out
        self.run_dir = run_dir or Path(self.settings.sqlite_path).parent / "up"
        self.slots = self.settings.slots or concurrency or DEFAULT_SLOTS
        self.name = f"ollama@{self.settings.service_id}"
        self.ollama: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.public_url: str | None = None

    def say(self, text: str) -> None:
        print(f"[avocado] {text}", file=self.out, flush=True)

    def __enter__(self) -> NotebookWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> NotebookWorker:
        """Ollama up and model pulled (or the server serving it), worker ready (and the
        tunnel announced); or stop all."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.settings.backend == "openai":
                self._check_server()
            else:
                self._ensure_ollama()
                self._pull()
            self._start_worker()
            if self.tunnel:
                self._await_announcement()
        except BaseException:
            self.stop()
            raise
        self.say(f"joined the fleet as {self.name}; jobs for {self.model} run here")
        return self

    def _ensure_ollama(self) -> None:
        url = self.settings.ollama_url.rstrip("/")
        if _answers(url):
            self.say(f"Ollama answers at {url}")
            return
        binary = shutil.which("ollama")
        if binary is None:
            if not _online():
                raise UpError(
                    f"Ollama is not installed, none answers at {url}, and this machine is "
                    f"offline: install it (curl -fsSL {INSTALL_SCRIPT} | sh) or set "
                    "AVOCADO_OLLAMA_URL to a running Ollama"
                )
            self.say("installing Ollama")
            subprocess.run(["sh", "-c", f"curl -fsSL {INSTALL_SCRIPT} | sh"], check=True)
            binary = shutil.which("ollama")
            if binary is None:
                raise UpError("the Ollama installer ran but no 'ollama' is on PATH")
        parts = urlsplit(url)
        env = {
            **os.environ,
            "OLLAMA_HOST": f"{parts.hostname}:{parts.port or 11434}",
            # What the worker is told it may run at once (AVOCADO_SLOTS).
            "OLLAMA_NUM_PARALLEL": os.environ.get("OLLAMA_NUM_PARALLEL", str(self.slots)),
        }
        log = (self.run_dir / "ollama.log").open("ab")
        self.say(f"starting ollama serve on {url} (log {self.run_dir / 'ollama.log'})")
        self.ollama = subprocess.Popen(
            [binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if not _wait(lambda: _answers(url), 60, self.ollama):
            raise UpError(f"ollama serve did not answer at {url}; see {self.run_dir}/ollama.log")

    def _check_server(self) -> None:
        """An OpenAI-compatible server cannot pull: it must answer and serve the model now."""
        url = self.settings.server_url
        client = make_backend(self.settings)
        try:
            served = client.models()
        except AvocadoError as error:
            raise UpError(f"no OpenAI-compatible server answers at {url}/models: {error}") from None
        finally:
            client.close()
        if self.model not in served:
            raise UpError(
                f"the server at {url} does not serve {self.model} (it serves: "
                f"{', '.join(served) or 'none'}): start it with that model or pass --model"
            )
        self.say(f"the OpenAI-compatible server at {url} serves {self.model}")

    def _pull(self) -> None:
        client = OllamaClient(
            self.settings.ollama_url, pull_timeout=self.settings.ollama_pull_timeout_s
        )
        try:
            if client.has_model(self.model):
                self.say(f"{self.model} is here already")
                return
            self.say(f"pulling {self.model}")
            client.pull(self.model, progress=progress_bar(self.out))
            self.out.write("\n")
        except AvocadoError as error:
            raise UpError(f"cannot pull {self.model}: {error}") from None
        finally:
            client.close()

    def _start_worker(self) -> None:
        env = {
            **os.environ,
            "AVOCADO_DEFAULT_MODEL": self.model,
            "AVOCADO_BACKEND": self.settings.backend,
        }
        if self.ollama is not None:  # the ollama serve it started runs that many at once
            env["AVOCADO_SLOTS"] = str(self.slots)
        if self.settings.backend_url:
            env["AVOCADO_BACKEND_URL"] = self.settings.backend_url
        if self.tunnel:
            env["AVOCADO_TUNNEL"] = "true"
        limit = session_limit(os.environ)
        if limit is not None and not (self.settings.cutoff or self.settings.cutoff_after_s):
            platform, after_s = limit
            env["AVOCADO_CUTOFF_AFTER_S"] = str(after_s)
            self.say(f"{platform} ends this session in {after_s / 3600:.1f} h: drains before")
        args = [sys.executable, "-m", "celery", "-A", "ollama_worker", "worker"]
        args += ["--hostname", self.name]
        if self.concurrency is not None:
            args += ["--concurrency", str(self.concurrency)]
        args += ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        if self.beat:
            args += ["--beat", "--schedule", str(self.run_dir / "beat-schedule")]
        log_path = self.run_dir / "worker.log"
        self.say(f"starting the worker (log {log_path})")
        with log_path.open("ab") as log:
            self.worker = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        app = make_celery("avocado-up", self.settings)
        try:
            ready = _wait(
                lambda: bool(app.control.ping(destination=[self.name], timeout=1.0)),
                120,
                self.worker,
            )
        finally:
            app.close()
        if not ready:
            raise UpError(f"the worker did not come up; see {log_path}")

    def _await_announcement(self) -> None:
        registry = NodeRegistry.from_settings(self.settings)
        try:
            assert self.worker is not None
            _wait(lambda: registry.get(self.settings.service_id) is not None, 60, self.worker)
            endpoint = registry.get(self.settings.service_id)
        finally:
            registry.close()
        if endpoint is None:
            self.say("no tunnel yet (see the worker log); jobs are served all the same")
            return
        self.public_url = endpoint.url
        server = "Ollama" if endpoint.backend == "ollama" else "the OpenAI-compatible server"
        self.say(
            f"{server} is public at {endpoint.url} (basic auth, user {self.settings.tunnel_user})"
        )

    def wait(self) -> int:
        """Block until the worker ends or the user interrupts; then stop everything."""
        try:
            return self.worker.wait() if self.worker is not None else 0
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the worker (it withdraws the announcement), then Ollama if we started it."""
        for name, process in (("worker", self.worker), ("ollama", self.ollama)):
            if process is None or process.poll() is not None:
                continue
            self.say(f"stopping {name}")
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            _kill_group(process.pid)
        self.worker = self.ollama = None


def session_limit(environ: Mapping[str, str]) -> tuple[str, float] | None:
    """The notebook platform this runs on and the seconds its session has left, counted from
    the machine's boot (a session's machine starts with it); None elsewhere."""
    platform = next((name for marker, name in _PLATFORMS if marker in environ), None)
    if platform is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = 0.0
    return platform, max(60.0, NOTEBOOK_SESSION_S - uptime)


def _kill_group(pid: int) -> None:
    """Whatever the process left in its session (pool children, an ngrok agent)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avocado-worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="join this machine to the fleet until interrupted")
    up.add_argument("--model", help="the model to pull and serve (default AVOCADO_DEFAULT_MODEL)")
    up.add_argument(
        "--backend",
        choices=["ollama", "openai"],
        help="the inference server's API (default AVOCADO_BACKEND, else ollama)",
    )
    up.add_argument(
        "--backend-url", help="a running OpenAI-compatible server, ending in /v1 (vLLM...)"
    )
    up.add_argument("--tunnel", action="store_true", help="expose the server through ngrok")
    up.add_argument("--beat", action="store_true", help="also run the re-announce schedule")
    up.add_argument(
        "--concurrency",
        type=int,
        help="jobs at once (default: as many as the server runs at once, AVOCADO_SLOTS)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``avocado-worker``: SIGTERM is treated as Ctrl-C, so both leave the fleet cleanly;
    SIGINT too when it was started ignoring it (a script's ``&``), which it would inherit."""
    parser = _parser()
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        node = NotebookWorker(
            args.model,
            tunnel=args.tunnel,
            beat=args.beat,
            concurrency=args.concurrency,
            backend=args.backend,
            backend_url=args.backend_url,
        )
    except ValidationError as error:  # --backend openai without a URL, or a URL for none
        parser.error("; ".join(str(e["msg"]) for e in error.errors()))
    try:
        node.start()
    except UpError as error:
        print(f"avocado-worker: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return node.wait()


if __name__ == "__main__":
    sys.exit(main())
