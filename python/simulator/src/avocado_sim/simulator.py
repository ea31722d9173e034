"""A fake Ollama HTTP server for tests and benchmarks: no GPU, no internet.

Speaks the real /api wire format (NDJSON streaming, error bodies, status codes),
and the OpenAI-compatible /v1 one (SSE, usage, response_format, OpenAI error objects),
with deterministic text, so producers can be tested like with
celery.contrib.testing. Run it alone with ``avocado-ollama-sim --port 0``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from types import FrameType, TracebackType

from avocado_sim._http import SimServer
from avocado_sim._state import Outcome, RecordedRequest, RequestLog, SimConfig, SimState

__all__ = ["OllamaSimulator", "Outcome", "RecordedRequest", "RequestLog", "SimConfig", "main"]


class OllamaSimulator:
    """An Ollama look-alike served from a background thread; a context manager."""

    def __init__(
        self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._state = SimState(config or SimConfig())
        self._host = host
        self._port = port
        self._server: SimServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SimConfig:
        """The live configuration; change fields between (or during) calls."""
        return self._state.config

    @config.setter
    def config(self, value: SimConfig) -> None:
        self._state.config = value

    @property
    def requests(self) -> RequestLog:
        """Every request received, oldest first; `.clear()` it between phases of a test."""
        return self._state.requests

    @property
    def generation_calls(self) -> int:
        """POSTs to /api/generate, /api/chat and the /v1 completions received, failed ones
        included."""
        with self._state.lock:
            return self._state.generation_calls

    @property
    def loads(self) -> int:
        """Models loaded into memory so far (``load_ms`` each): every swap is one."""
        return self._state.loads

    @property
    def abandoned(self) -> int:
        """Answers the client stopped reading: it closed the connection before their end,
        as a worker does when its job is cancelled."""
        with self._state.lock:
            return self._state.abandoned

    @property
    def outcomes(self) -> Counter[Outcome]:
        """Generation calls that ended, by how (answered, refused, cut); each recorded
        request's ``outcome`` says which was which."""
        with self._state.lock:
            return Counter(self._state.outcomes)

    def hold(self) -> None:
        """Hold every answer in its slot before its first byte, until ``release``: a test
        then acts while known calls are in flight (kills their client, say)."""
        self._state.released.clear()

    def release(self) -> None:
        """Send the held answers (a client gone by then gets none: its call is cut)."""
        self._state.released.set()

    @property
    def held(self) -> int:
        """Answers waiting for ``release``."""
        with self._state.lock:
            return self._state.held

    def clear(self) -> None:
        """Forget recorded requests and zero `generation_calls`, `outcomes` and `abandoned`,
        e.g. between tests."""
        with self._state.lock:
            self._state.requests.clear()
            self._state.generation_calls = 0
            self._state.outcomes.clear()
            self._state.abandoned = 0

    @property
    def in_flight(self) -> int:
        """Generations holding or waiting for a slot right now."""
        gate = self._state.gate
        return gate.running + gate.waiting

    def wait_in_flight(self, count: int, timeout: float = 5.0) -> bool:
        """Block until `count` generations are running or queued; False on timeout."""
        return self._state.gate.wait_for(count, timeout)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to hand to a client, e.g. ``http://127.0.0.1:40123``."""
        host = self._host if ":" not in self._host else f"[{self._host.strip('[]')}]"
        return f"http://{host}:{self.port}"

    def start(self) -> OllamaSimulator:
        """Bind and serve in a daemon thread; returns self for chaining."""
        if self._server is not None:
            return self
        self._state.stopping.clear()
        self._server = SimServer(self._host, self._port, self._state)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ollama-sim:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections, as if Ollama went away."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._state.stopping.set()
        self._state.gate.wake_all()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> OllamaSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"OllamaSimulator({where})"


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avocado-ollama-sim", description="Serve a simulated Ollama HTTP API."
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=11434, help="port; 0 picks a free one")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before the answer")
    p.add_argument(
        "--latency-jitter-ms", type=float, default=0.0, help="vary each delay by +/- this"
    )
    p.add_argument("--tokens-per-s", type=float, default=None, help="pace streamed tokens")
    p.add_argument("--models", type=_names, default=["llama3.2:1b"], help="pulled models, a,b")
    p.add_argument("--hub", type=_names, default=None, help="pullable models (default any)")
    p.add_argument("--fail-first", type=int, default=0, help="fail the first K generations")
    p.add_argument("--fail-status", type=int, default=503, help="status for those failures")
    p.add_argument(
        "--parallel",
        type=int,
        default=int(os.environ.get("OLLAMA_NUM_PARALLEL") or 4),
        help="generation slots (default OLLAMA_NUM_PARALLEL, else 4)",
    )
    p.add_argument("--load-ms", type=float, default=0.0, help="time to load a model")
    p.add_argument("--max-loaded", type=int, default=0, help="models in memory at once (0: any)")
    p.add_argument("--max-queue", type=int, default=512, help="requests waiting for a slot")
    p.add_argument("--context-length", type=int, default=4096, help="reported context size")
    p.add_argument(
        "--allowed-hosts", type=_names, default=None, help="Host headers accepted, a,b or *"
    )
    return p


def _serve_args(argv: Sequence[str]) -> list[str]:
    """``serve`` as ``ollama serve`` takes it: the address from ``OLLAMA_HOST``, so the
    simulator can stand in for the ``ollama`` binary (a link named ``ollama``)."""
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    return ["--host", host or "127.0.0.1", "--port", port or "11434", *argv[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: serve until SIGTERM or SIGINT, then exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(_serve_args(argv) if argv[:1] == ["serve"] else argv)
    try:
        config = SimConfig(
            models=args.models,
            hub=args.hub,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            tokens_per_s=args.tokens_per_s,
            fail_first=args.fail_first,
            fail_status=args.fail_status,
            parallel=args.parallel,
            load_ms=args.load_ms,
            max_loaded=args.max_loaded,
            max_queue=args.max_queue,
            context_length=args.context_length,
            max_recorded=0,  # nobody can read them from outside the process
        )
    except ValueError as exc:
        print(f"avocado-ollama-sim: {exc}", file=sys.stderr)
        return 2
    if args.allowed_hosts is not None:
        config.allowed_hosts = args.allowed_hosts

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = (
        {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if in_main
        else {}
    )
    sim = OllamaSimulator(config, host=args.host, port=args.port)
    try:
        try:
            sim.start()
        except OSError as exc:
            print(
                f"avocado-ollama-sim: cannot listen on {args.host}:{args.port}: {exc}",
                file=sys.stderr,
            )
            return 1
        print(f"avocado-ollama-sim listening on {sim.url}", flush=True)
        stop.wait()
    finally:
        sim.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
