"""The fake ngrok agent, driven by pyngrok's own code: real processes, real sockets.

pyngrok keeps one agent per ``ngrok_path`` in a module-level registry, so every test
kills the agents it started; a second agent at once needs a second path (a symlink).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pyngrok import ngrok, process
from pyngrok.conf import PyngrokConfig
from pyngrok.exception import PyngrokNgrokError, PyngrokNgrokHTTPError

from tests.fake_ngrok import VERSION, fake_ngrok_path
from tests.services import free_port

TOKEN = "test-token-5e1f0c"
USER, PASSWORD = "avocado", "tunnel-pass-8d2b"
SHORT_PASSWORD = "pw-7chr"
ConfigFactory = Callable[..., PyngrokConfig]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """What the local service behind the tunnel received, and a gate for its stream."""

    port: int
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    released_in_time: list[bool] = field(default_factory=list)


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.upstream.seen.append(Seen(self.command, self.path, headers, body))
        if self.path == "/stream":
            self._stream(body)
            return
        reply = f"{self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _stream(self, body: bytes) -> None:
        """NDJSON like Ollama's: the first line, then the rest once the test allows it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk({"n": 1, "echo": body.decode()})
        upstream = self.server.upstream
        upstream.released_in_time.append(upstream.release.wait(5))
        for obj in ({"n": 2}, {"n": 3, "done": True}):
            self._chunk(obj)
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    upstream: Upstream


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = _UpstreamServer(("127.0.0.1", 0), _UpstreamHandler)
    server.upstream = Upstream(port=server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.upstream
    server.upstream.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyngrok and the agent both read these; a developer's own must not leak in."""
    for name in ("NGROK_AUTHTOKEN", "NGROK_API_KEY", "FAKE_NGROK_OFFLINE", "PYNGROK_NGROK_PATH"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def log_lines() -> list[str]:
    """Every line the agents of a test logged, as pyngrok's callback received them."""
    return []


@pytest.fixture
def make_config(tmp_path: Path, log_lines: list[str]) -> Iterator[ConfigFactory]:
    """PyngrokConfigs for the fake agent, each with its own config file; agents killed after."""
    made: list[PyngrokConfig] = []

    def factory(config_text: str = 'version: "3"\n', **overrides: Any) -> PyngrokConfig:
        path = tmp_path / f"ngrok-{len(made)}.yml"
        path.write_text(config_text)
        options: dict[str, Any] = {
            "ngrok_path": fake_ngrok_path(),
            "config_path": str(path),
            "auth_token": TOKEN,
            "ngrok_version": "v3",
            "config_version": "2",
            "startup_timeout": 10,
            "log_event_callback": lambda log: log_lines.append(log.line),
            **overrides,
        }
        config = PyngrokConfig(**options)
        made.append(config)
        return config

    yield factory
    for config in made:
        ngrok.kill(config)


def _second_path(tmp_path: Path) -> str:
    """Another ngrok_path for the same fake: pyngrok runs one agent per path."""
    link = tmp_path / f"ngrok-link-{time.monotonic_ns()}"
    link.symlink_to(fake_ngrok_path())
    return str(link)


def _refused(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _open(config: PyngrokConfig, upstream: Upstream, **options: Any) -> ngrok.NgrokTunnel:
    return ngrok.connect(str(upstream.port), "http", pyngrok_config=config, **options)


def test_basic_auth_and_host_rewrite(make_config: ConfigFactory, upstream: Upstream) -> None:
    config = make_config()
    tunnel = _open(config, upstream, basic_auth=[f"{USER}:{PASSWORD}"], host_header="rewrite")

    assert tunnel.public_url is not None
    assert tunnel.public_url.startswith("http://127.0.0.1:")
    assert tunnel.config["addr"] == f"http://localhost:{upstream.port}"
    with httpx.Client(base_url=tunnel.public_url, timeout=5) as http:
        ok = http.get("/api/tags", auth=(USER, PASSWORD))
        anonymous = http.get("/api/tags")
        wrong = http.get("/api/tags", auth=(USER, "not-the-password"))

    assert ok.status_code == 200
    assert ok.text == "GET /api/tags"
    for refused in (anonymous, wrong):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Basic realm="ngrok"'
    assert len(upstream.seen) == 1
    seen = upstream.seen[0]
    assert seen.headers["host"] == f"localhost:{upstream.port}"
    assert "authorization" not in seen.headers
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"


def test_streamed_response_arrives_line_by_line(
    make_config: ConfigFactory, upstream: Upstream
) -> None:
    tunnel = _open(make_config(), upstream, host_header="rewrite")
    assert tunnel.public_url is not None

    with httpx.stream("POST", f"{tunnel.public_url}/stream", json={"p": 1}, timeout=5) as reply:
        lines = reply.iter_lines()
        first = json.loads(next(lines))
        upstream.release.set()  # only now may the upstream write the rest
        rest = [json.loads(line) for line in lines if line]

    assert first == {"n": 1, "echo": '{"p":1}'}
    assert rest == [{"n": 2}, {"n": 3, "done": True}]
    # False had the proxy held line 1 back until the upstream gave up waiting.
    assert upstream.released_in_time == [True]


def test_methods_and_request_bodies_are_forwarded(
    make_config: ConfigFactory, upstream: Upstream
) -> None:
    tunnel = _open(make_config(), upstream)
    with httpx.Client(base_url=str(tunnel.public_url), timeout=5) as http:
        head = http.head("/api/version")
        put = http.put("/api/blob", content=iter([b"chunked ", b"body"]))
        delete = http.request("DELETE", "/api/delete", json={"model": "m"})

    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len("HEAD /api/version"))
    assert put.text == "PUT /api/blob"
    assert delete.text == "DELETE /api/delete"
    bodies = [(s.method, s.body) for s in upstream.seen]
    assert bodies == [("HEAD", b""), ("PUT", b"chunked body"), ("DELETE", b'{"model":"m"}')]
    # No host_header option: the upstream sees the public hostname, as through real ngrok.
    assert upstream.seen[0].headers["host"].endswith(".ngrok-free.app")


def test_disconnect_closes_the_tunnel(make_config: ConfigFactory, upstream: Upstream) -> None:
    config = make_config()
    tunnel = _open(config, upstream)
    url = str(tunnel.public_url)
    assert httpx.get(f"{url}/x", timeout=5).status_code == 200
    assert [t.public_url for t in ngrok.get_tunnels(config)] == [url]

    ngrok.disconnect(url, config)

    assert ngrok.get_tunnels(config) == []
    assert _refused(url)
    assert ngrok.get_ngrok_process(config).proc.poll() is None


def test_killed_agent_takes_its_tunnels_along(
    make_config: ConfigFactory, upstream: Upstream
) -> None:
    config = make_config()
    first = _open(config, upstream)
    agent = ngrok.get_ngrok_process(config)

    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(timeout=5)

    assert agent.proc.poll() == -signal.SIGKILL
    assert not agent.healthy()
    assert not process.is_process_running(config.ngrok_path)
    assert _refused(str(first.public_url))

    ngrok.kill(config)
    second = _open(config, upstream)

    assert ngrok.get_ngrok_process(config).proc.pid != agent.proc.pid
    assert second.public_url != first.public_url
    assert httpx.get(f"{second.public_url}/again", timeout=5).status_code == 200


def test_sigterm_stops_agent_and_tunnels(make_config: ConfigFactory, upstream: Upstream) -> None:
    config = make_config()
    tunnel = _open(config, upstream)
    agent = ngrok.get_ngrok_process(config)

    agent.proc.terminate()

    assert agent.proc.wait(timeout=5) == 0
    assert _refused(str(tunnel.public_url))
    assert _refused(str(agent.api_url))


def test_missing_authtoken_fails_like_ngrok(make_config: ConfigFactory) -> None:
    config = make_config(auth_token=None)
    with pytest.raises(PyngrokNgrokError) as failure:
        ngrok.connect("11434", pyngrok_config=config)

    assert failure.value.ngrok_error_code == "ERR_NGROK_4018"
    assert "authentication failed" in str(failure.value)
    assert not process.is_process_running(config.ngrok_path)


@pytest.mark.parametrize("mode", ["1", "retry"])
def test_offline_agent_fails_start(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Mode "1" exits at once; "retry" keeps retrying, as ngrok does, until pyngrok gives up."""
    monkeypatch.setenv("FAKE_NGROK_OFFLINE", mode)
    # "retry" waits this long for nothing: short, but long enough for the agent (a Python
    # process) to start and log its first failure on a busy machine (1 s was not, seen).
    config = make_config(startup_timeout=3)
    with pytest.raises(PyngrokNgrokError) as failure:
        ngrok.connect("11434", pyngrok_config=config)

    assert failure.value.ngrok_error is not None
    assert "failed to dial ngrok server" in failure.value.ngrok_error
    assert not process.is_process_running(config.ngrok_path)


def test_secrets_never_logged(
    make_config: ConfigFactory, upstream: Upstream, log_lines: list[str]
) -> None:
    config = make_config()
    tunnel = _open(config, upstream, basic_auth=[f"{USER}:{PASSWORD}"])
    with httpx.Client(base_url=str(tunnel.public_url), timeout=5) as http:
        assert http.get("/a", auth=(USER, PASSWORD)).status_code == 200
        assert http.get("/b", auth=(USER, "wrong-password")).status_code == 401
    with pytest.raises(PyngrokNgrokHTTPError) as short:
        _open(config, upstream, name="weak", basic_auth=[f"{USER}:{SHORT_PASSWORD}"])
    ngrok.disconnect(str(tunnel.public_url), config)

    assert short.value.status_code == 400
    assert SHORT_PASSWORD not in short.value.body
    text = "\n".join(log_lines)
    for expected in ("starting web service", "started tunnel", "join connections"):
        assert expected in text
    for secret in (TOKEN, PASSWORD, SHORT_PASSWORD):
        assert secret not in text
    agent_logs = "\n".join(log.line for log in ngrok.get_ngrok_process(config).logs)
    assert TOKEN not in agent_logs
    assert PASSWORD not in agent_logs


def test_short_authtoken_leaves_log_lines_intact(
    make_config: ConfigFactory, upstream: Upstream, log_lines: list[str]
) -> None:
    """Blanking a one-letter token would garble "tunnel session started" and hang pyngrok."""
    tunnel = _open(make_config(auth_token="t"), upstream)

    assert tunnel.public_url is not None
    assert any('msg="tunnel session started"' in line for line in log_lines)


def test_api_shapes_and_errors(make_config: ConfigFactory, upstream: Upstream) -> None:
    config = make_config()
    tunnel = _open(config, upstream, name="ollama", metadata="worker-1")
    api_url = ngrok.get_ngrok_process(config).api_url

    listing = ngrok.api_request(f"{api_url}/api/tunnels")
    one = ngrok.api_request(f"{api_url}/api/tunnels/ollama")
    with pytest.raises(PyngrokNgrokHTTPError) as missing:
        ngrok.api_request(f"{api_url}/api/tunnels/nope")
    with pytest.raises(PyngrokNgrokHTTPError) as unknown:
        _open(config, upstream, name="typo", auth_token="oops")

    assert listing["uri"] == "/api/tunnels"
    assert listing["tunnels"] == [one]
    assert one["public_url"] == tunnel.public_url
    assert one["uri"] == "/api/tunnels/ollama"
    assert one["config"] == {"addr": f"http://localhost:{upstream.port}", "inspect": True}
    assert one["metadata"] == "worker-1"
    assert set(one["metrics"]) == {"conns", "http"}
    assert missing.value.status_code == 404
    assert json.loads(missing.value.body)["status_code"] == 404
    error = json.loads(unknown.value.body)
    assert (error["error_code"], error["msg"]) == (102, "invalid tunnel configuration")
    assert "field auth_token not found" in error["details"]["err"]


def test_endpoints_api_of_pyngrok_default(make_config: ConfigFactory, upstream: Upstream) -> None:
    """pyngrok's default config_version "3" goes through /api/endpoints instead."""
    config = make_config(config_version="3")
    tunnel = _open(config, upstream, host_header="rewrite")
    down = ngrok.connect("1", "http", pyngrok_config=config)

    assert tunnel.upstream == {"url": f"http://localhost:{upstream.port}", "protocol": "http1"}
    assert httpx.get(f"{tunnel.public_url}/e", timeout=5).text == "GET /e"
    failed = httpx.get(f"{down.public_url}/e", timeout=5)
    assert (failed.status_code, failed.headers["ngrok-error-code"]) == (502, "ERR_NGROK_8012")
    assert {t.public_url for t in ngrok.get_tunnels(config)} == {tunnel.public_url, down.public_url}
    ngrok.disconnect(str(tunnel.public_url), config)
    assert _refused(str(tunnel.public_url))


def test_domain_is_held_by_one_live_agent(
    make_config: ConfigFactory, upstream: Upstream, tmp_path: Path
) -> None:
    domain = f"ollama-{os.getpid()}-{time.monotonic_ns()}.example.ngrok.app"
    first = make_config()
    tunnel = _open(first, upstream, domain=domain)
    second = make_config(ngrok_path=_second_path(tmp_path))

    with pytest.raises(PyngrokNgrokHTTPError) as taken:
        _open(second, upstream, domain=domain)
    ngrok.kill(first)
    moved = _open(second, upstream, domain=domain)

    assert tunnel.config["domain"] == domain
    assert taken.value.status_code == 502
    assert "ERR_NGROK_334" in taken.value.body
    assert httpx.get(f"{moved.public_url}/d", timeout=5).status_code == 200
    assert upstream.seen[-1].headers["host"] == domain


def test_authtoken_from_config_file_and_cli_commands(
    make_config: ConfigFactory, upstream: Upstream
) -> None:
    config = make_config(auth_token=None)

    # pyngrok runs no other ngrok command while an agent runs at the same ngrok_path.
    version = ngrok.get_version(config)[0]
    ngrok.set_auth_token(TOKEN, config)
    tunnel = _open(config, upstream)

    assert version == VERSION
    assert TOKEN in Path(str(config.config_path)).read_text()
    assert httpx.get(f"{tunnel.public_url}/f", timeout=5).status_code == 200


def test_web_addr_from_config_file(make_config: ConfigFactory, tmp_path: Path) -> None:
    port = free_port()
    text = f'version: "3"\nagent:\n  web_addr: 127.0.0.1:{port}\n'
    first = make_config(text)
    second = make_config(text, ngrok_path=_second_path(tmp_path))

    api_url = ngrok.get_ngrok_process(first).api_url
    with pytest.raises(PyngrokNgrokError) as taken:
        ngrok.get_ngrok_process(second)

    assert api_url == f"http://127.0.0.1:{port}"
    assert taken.value.ngrok_error == f"listen tcp 127.0.0.1:{port}: bind: address already in use"
