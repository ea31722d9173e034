"""The agent's local API on ``web_addr``: start, list and stop tunnels as ngrok v3 does.

/api/tunnels answers in the tunnel shape (pyngrok with ``config_version="2"``),
/api/endpoints in the endpoint shape (pyngrok's default ``"3"``); both see the same
tunnels. Error bodies keep the agent's ``{"error_code", "status_code", "msg",
"details": {"err"}}`` shape; codes 102 and 103 are the agent's, the others are guesses.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from tests.fake_ngrok._log import AgentLog
from tests.fake_ngrok._options import OptionsError, TunnelSpec, parse_options
from tests.fake_ngrok._proxy import TunnelProxy

__all__ = ["ApiServer", "Tunnels"]

_FAMILIES = ("tunnels", "endpoints")


class ApiError(Exception):
    """An API failure, carried to the client in the agent's JSON error shape."""

    def __init__(self, status: int, code: int, msg: str, err: str) -> None:
        super().__init__(err)
        self.status = status
        self.msg = msg
        self.body = {"error_code": code, "status_code": status, "msg": msg, "details": {"err": err}}


@dataclass
class _Tunnel:
    spec: TunnelSpec
    proxy: TunnelProxy
    claim: socket.socket | None
    id: str = field(default_factory=lambda: secrets.token_hex(16))

    def render(self, family: str) -> dict[str, Any]:
        spec = self.spec
        config: dict[str, Any] = {"addr": spec.addr, "inspect": spec.inspect}
        if spec.domain:
            config["domain"] = spec.domain
        if spec.host_header:
            config["host_header"] = spec.host_header
        data: dict[str, Any] = {
            "ID": self.id,
            "name": spec.name,
            "uri": f"/api/{family}/{quote(spec.name, safe='')}",
            "proto": "http",
            "config": config,
            "metrics": self.proxy.metrics(),
        }
        if family == "tunnels":
            data["public_url"] = self.proxy.public_url
        else:
            data["url"] = self.proxy.public_url
            data["upstream"] = {"url": spec.addr, "protocol": "http1"}
        if spec.metadata:
            data["metadata"] = spec.metadata
        return data


def _claim(domain: str) -> socket.socket | None:
    """Hold ``domain`` for this process's life; OSError when another live agent holds it.

    The kernel frees an abstract Unix socket name when its process dies, even by SIGKILL,
    as ngrok's cloud frees an endpoint when the agent that held it is gone.
    """
    if not sys.platform.startswith("linux"):
        return None  # no abstract sockets: only this agent's own tunnels are compared
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(b"\0avocado-fake-ngrok/" + domain.lower().encode())
    except OSError:
        sock.close()
        raise
    return sock


def _already_online(domain: str) -> ApiError:
    err = (
        f"failed to start tunnel: The endpoint 'https://{domain}' is already online. Either\n"
        "1. stop your existing endpoint first, or\n"
        "2. start both endpoints with `--pooling-enabled` to load balance between them.\r\n"
        "\r\nERR_NGROK_334\r\n"
    )
    return ApiError(502, 103, "failed to start tunnel", err)


class Tunnels:
    """The agent's running tunnels by name; each has its own proxy and port."""

    def __init__(self, log: AgentLog) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._by_name: dict[str, _Tunnel] = {}

    def start(self, options: object) -> _Tunnel:
        try:
            spec = parse_options(options)
        except OptionsError as exc:
            raise ApiError(400, 102, "invalid tunnel configuration", str(exc)) from exc
        self._log.hide(*(entry.partition(":")[2] for entry in spec.credentials))
        with self._lock:
            if spec.name in self._by_name:
                err = f"a tunnel named {spec.name!r} is already running"
                raise ApiError(400, 102, "invalid tunnel configuration", err)
            claim = None
            if spec.domain:
                if any(t.spec.domain == spec.domain for t in self._by_name.values()):
                    raise _already_online(spec.domain)
                try:
                    claim = _claim(spec.domain)
                except OSError as exc:
                    raise _already_online(spec.domain) from exc
            tunnel = _Tunnel(spec, TunnelProxy(spec, self._log), claim)
            self._by_name[spec.name] = tunnel
        self._log(
            "info",
            "started tunnel",
            obj="tunnels",
            name=spec.name,
            addr=spec.addr,
            url=tunnel.proxy.public_url,
        )
        return tunnel

    def get(self, name: str) -> _Tunnel:
        with self._lock:
            tunnel = self._by_name.get(name)
        if tunnel is None:
            raise ApiError(404, 100, "tunnel not found", f"tunnel {name!r} not found")
        return tunnel

    def all(self) -> list[_Tunnel]:
        with self._lock:
            return list(self._by_name.values())

    def stop(self, name: str) -> None:
        with self._lock:
            tunnel = self._by_name.pop(name, None)
        if tunnel is None:
            raise ApiError(404, 100, "tunnel not found", f"tunnel {name!r} not found")
        tunnel.proxy.close()
        if tunnel.claim is not None:
            tunnel.claim.close()
        self._log("info", "stopped tunnel", obj="tunnels", name=name)

    def stop_all(self) -> None:
        for tunnel in self.all():
            with contextlib.suppress(ApiError):
                self.stop(tunnel.spec.name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: only failures are logged, as the agent does."""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            status, payload = self._route(path, raw)
        except ApiError as exc:
            self.server.log("warn", exc.msg, pg=path, id=secrets.token_hex(8), err=str(exc))
            status, payload = exc.status, exc.body
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_GET

    def _route(self, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        tunnels = self.server.tunnels
        parts = path.strip("/").split("/")
        if parts == ["api", "status"] and self.command == "GET":
            return 200, self.server.status()
        if len(parts) not in (2, 3) or parts[0] != "api" or parts[1] not in _FAMILIES:
            raise ApiError(404, 100, "not found", f"no API resource at {path}")
        family = parts[1]
        if len(parts) == 3 and self.command in ("GET", "DELETE"):
            name = unquote(parts[2])
            if self.command == "DELETE":
                tunnels.stop(name)
                return 204, None
            return 200, tunnels.get(name).render(family)
        if len(parts) == 2 and self.command == "GET":
            listing = [t.render(family) for t in tunnels.all()]
            return 200, {family: listing, "uri": f"/api/{family}"}
        if len(parts) == 2 and self.command == "POST":
            try:
                options = json.loads(raw or b"null")
            except ValueError as exc:
                raise ApiError(400, 102, "invalid tunnel configuration", str(exc)) from exc
            return 201, tunnels.start(options).render(family)
        raise ApiError(405, 101, "method not allowed", f"{self.command} {path} is not allowed")


class ApiServer(ThreadingHTTPServer):
    """The web service: the JSON API on ``host:port``, served from a daemon thread."""

    daemon_threads = True

    def __init__(
        self, host: str, port: int, tunnels: Tunnels, log: AgentLog, status: dict[str, Any]
    ) -> None:
        self.tunnels = tunnels
        self.log = log
        self._status = status
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="web", daemon=True
        )
        self._thread.start()

    def status(self) -> dict[str, Any]:
        return {**self._status, "uri": "/api/status"}

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
