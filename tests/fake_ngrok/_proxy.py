"""One tunnel: a loopback listener standing in for the ngrok edge plus the agent's forwarding.

It enforces basic auth, sets the Host header the upstream would see through ngrok and
streams bodies both ways chunk by chunk, so NDJSON from Ollama arrives as it is written.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import http.client
import secrets
import socket
import sys
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fake_ngrok._log import AgentLog
from tests.fake_ngrok._options import TunnelSpec

__all__ = ["TunnelProxy"]

# Hop-by-hop headers, plus those the proxy sets itself.
_NOT_COPIED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
        "host",
    }
)
_CHUNK = 65536


def _not_copied(headers: Message) -> frozenset[str]:
    """Header names not to pass on, those the message's Connection header lists included."""
    listed = ",".join(headers.get_all("Connection") or [])
    return _NOT_COPIED | {t.strip().lower() for t in listed.split(",") if t.strip()}


def _read_body(handler: BaseHTTPRequestHandler) -> bytes | None:
    """The whole request body (chunked or sized), or None when the request has none."""
    rfile, headers = handler.rfile, handler.headers
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        parts: list[bytes] = []
        while size := int(rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16):
            parts.append(rfile.read(size))
            rfile.readline(65537)
        while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts)
    length = headers.get("Content-Length")
    return None if length is None else rfile.read(int(length))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: TunnelProxy

    def setup(self) -> None:
        super().setup()
        self.server.joined(self.client_address)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the agent logs connections, not requests."""

    def do_GET(self) -> None:
        spec = self.server.spec
        self.server.count_request()
        try:
            body = _read_body(self)
        except ValueError:
            self.close_connection = True
            self._reply(400, "Bad Request", b"malformed request body\n", [])
            return
        if spec.credentials and not self._authorized(spec.credentials):
            challenge = [("WWW-Authenticate", 'Basic realm="ngrok"')]
            self._reply(401, "Unauthorized", b"Unauthorized\n", challenge)
            return
        upstream = http.client.HTTPConnection(spec.host, spec.port)
        try:
            try:
                self._send_upstream(upstream, body)
                response = upstream.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._bad_gateway(exc)
                return
            self._relay(response)
        finally:
            upstream.close()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _authorized(self, credentials: tuple[str, ...]) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        # Compare with every entry, not stopping at a match, so timing says nothing.
        matches = [hmac.compare_digest(given, entry.encode()) for entry in credentials]
        return any(matches)

    def _send_upstream(self, upstream: http.client.HTTPConnection, body: bytes | None) -> None:
        spec = self.server.spec
        skip = _not_copied(self.headers)
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        upstream.putheader("Host", spec.host_header or spec.hostname)
        forwarded_for = self.client_address[0]
        for name, value in self.headers.items():
            lname = name.lower()
            if lname in skip or (lname == "authorization" and spec.credentials):
                continue
            if lname == "x-forwarded-for":
                forwarded_for = f"{value}, {forwarded_for}"
            elif not lname.startswith("x-forwarded-"):
                upstream.putheader(name, value)
        upstream.putheader("X-Forwarded-For", forwarded_for)
        upstream.putheader("X-Forwarded-Host", spec.hostname)
        upstream.putheader("X-Forwarded-Proto", "http")
        if body is not None:
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body)

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send the upstream's answer on, writing each piece as soon as it is read."""
        skip = _not_copied(response.msg)
        headers = [(n, v) for n, v in response.getheaders() if n.lower() not in skip]
        bodiless = self.command == "HEAD" or response.status in (204, 304)
        sized = not response.chunked and response.length is not None
        chunked = not bodiless and not sized and self.request_version == "HTTP/1.1"
        if bodiless or sized:
            length = response.getheader("Content-Length")
            headers += [("Content-Length", length)] if length is not None else []
        elif chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True
        self._head(response.status, response.reason, headers)
        if bodiless:
            return
        try:
            while data := response.read1(_CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        except (OSError, http.client.HTTPException):
            self.close_connection = True  # cut mid-body: the client sees it cut too
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _bad_gateway(self, exc: BaseException) -> None:
        addr = self.server.spec.addr.removeprefix("http://")
        text = (
            "Traffic was successfully tunneled to the ngrok agent, but the agent failed to "
            f"establish a connection to the upstream web service at {addr}. The error "
            f"encountered was: {exc}\n\nERR_NGROK_8012\n"
        )
        headers = [("Ngrok-Error-Code", "ERR_NGROK_8012")]
        self._reply(502, "Bad Gateway", text.encode(), headers)

    def _reply(self, status: int, reason: str, body: bytes, headers: list[tuple[str, str]]) -> None:
        headers = [
            *headers,
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
        ]
        self._head(status, reason, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {reason}", *(f"{n}: {v}" for n, v in headers)]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


class TunnelProxy(ThreadingHTTPServer):
    """The tunnel's public side on a fresh loopback port, served from a daemon thread."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, spec: TunnelSpec, log: AgentLog) -> None:
        self.spec = spec
        self._log = log
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._counts = {"conns": 0, "http": 0}
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tunnel:{spec.name}",
            daemon=True,
        )
        self._thread.start()

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def joined(self, client: tuple[str, int]) -> None:
        with self._lock:
            self._counts["conns"] += 1
        self._log(
            "info",
            "join connections",
            obj="join",
            id=secrets.token_hex(6),
            l=self.spec.addr.removeprefix("http://"),
            r=f"{client[0]}:{client[1]}",
        )

    def count_request(self) -> None:
        with self._lock:
            self._counts["http"] += 1

    def metrics(self) -> dict[str, dict[str, float]]:
        """The agent's metrics block; counts are real, rates and percentiles stay 0."""
        zeros = dict.fromkeys(("rate1", "rate5", "rate15", "p50", "p90", "p95", "p99"), 0.0)
        with self._lock:
            return {
                "conns": {"count": self._counts["conns"], "gauge": len(self._conns), **zeros},
                "http": {"count": self._counts["http"], **zeros},
            }

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients and upstreams hang up mid-stream; that is no error worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close(self) -> None:
        """Stop listening and cut open connections, as when ngrok stops a tunnel."""
        self.shutdown()
        self.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
