"""Tunnel options as POSTed to the agent API, checked the way the real agent checks them.

Both shapes are read: the tunnel one (``addr``/``proto``, /api/tunnels) and the endpoint
one (``upstream``/``url``, /api/endpoints). An unknown field is refused with the real
agent's error text; a real field the fake does not emulate is refused too, by name, so
that no test passes on an option that silently did nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["OptionsError", "TunnelSpec", "parse_options"]

_FAKED = frozenset(
    {
        "name",
        "addr",
        "proto",
        "upstream",
        "url",
        "domain",
        "hostname",
        "basic_auth",
        "host_header",
        "schemes",
        "inspect",
        "metadata",
        "description",
    }
)
_NOT_FAKED = frozenset(
    {
        "subdomain",
        "crt",
        "key",
        "compression",
        "websocket_tcp_converter",
        "request_header",
        "response_header",
        "ip_restriction",
        "circuit_breaker",
        "oauth",
        "oidc",
        "webhook_verification",
        "verify_webhook",
        "mutual_tls_cas",
        "traffic_policy",
        "labels",
        "pooling_enabled",
        "bindings",
        "user_agent_filter",
    }
)

_SCHEMES = ("http", "https")


class OptionsError(Exception):
    """The options cannot start a tunnel; the message is safe to log (no credentials)."""


@dataclass(frozen=True)
class TunnelSpec:
    """One tunnel: where it forwards, what the edge enforces, and what it reports."""

    name: str
    addr: str
    host: str
    port: int
    hostname: str
    domain: str | None = None
    host_header: str | None = None
    credentials: tuple[str, ...] = ()
    inspect: bool = True
    metadata: str | None = None


def _upstream(addr: object) -> tuple[str, str, int]:
    """ngrok's reading of ``addr``: a port, host:port or URL, with localhost by default."""
    text = str(addr).strip()
    if text.isdigit():
        text = f"localhost:{text}"
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme != "http":
        raise OptionsError(f"the fake ngrok agent forwards to http:// upstreams only, not {text!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise OptionsError(f"invalid upstream address {text!r}: {exc}") from exc
    if not parts.hostname or not 0 < port < 65536:
        raise OptionsError(f"invalid upstream address {text!r}")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}", host, port


def _credentials(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OptionsError('basic_auth must be a list of "user:password" strings')
    for entry in value:
        user, sep, password = entry.partition(":")
        if not sep or not user:
            raise OptionsError('basic_auth entries must look like "user:password"')
        if not 8 <= len(password) <= 128:
            raise OptionsError("basic_auth passwords must be between 8 and 128 characters")
    return tuple(value)


def _text(options: dict[str, Any], key: str) -> str | None:
    value = options.get(key)
    if value is not None and not isinstance(value, str):
        raise OptionsError(f"{key} must be a string")
    return value


def _domain(options: dict[str, Any]) -> str | None:
    url = _text(options, "url")
    if url:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https"):
            raise OptionsError(f"the fake ngrok agent serves http endpoints only, not {url!r}")
        return parts.hostname
    return _text(options, "domain") or _text(options, "hostname")


def _addr(options: dict[str, Any]) -> object:
    upstream = options.get("upstream")
    if upstream is None:
        return options.get("addr", "80")
    if not isinstance(upstream, dict) or not isinstance(upstream.get("url"), (str, int)):
        raise OptionsError("upstream must be a mapping with a url")
    if upstream.get("protocol", "http1") != "http1":
        raise OptionsError("the fake ngrok agent speaks http1 to upstreams only")
    return upstream["url"]


def parse_options(options: object) -> TunnelSpec:
    """A TunnelSpec for a POSTed body; OptionsError says why there is none."""
    if not isinstance(options, dict):
        raise OptionsError("the tunnel configuration must be a JSON object")
    for key in options:
        if key in _NOT_FAKED:
            raise OptionsError(f"the fake ngrok agent does not implement {key!r}")
        if key not in _FAKED:
            raise OptionsError(
                f"yaml: unmarshal errors:\n  line 1: field {key} not found in type "
                "config.HTTPv2Tunnel"
            )
    name = _text(options, "name")
    if not name:
        raise OptionsError("a tunnel name is required")
    proto = options.get("proto", "http")
    if proto != "http":
        raise OptionsError(f"the fake ngrok agent does not implement {proto!r} tunnels")
    schemes = options.get("schemes", ["https"])
    if not isinstance(schemes, list) or not schemes or any(s not in _SCHEMES for s in schemes):
        raise OptionsError('schemes must list "http" and/or "https"')
    inspect = options.get("inspect", True)
    if not isinstance(inspect, bool):
        raise OptionsError("inspect must be a boolean")
    addr, host, port = _upstream(_addr(options))
    domain = _domain(options)
    header = _text(options, "host_header")
    if header == "rewrite":
        header = addr.removeprefix("http://")
    elif header == "preserve":
        header = None
    return TunnelSpec(
        name=name,
        addr=addr,
        host=host,
        port=port,
        hostname=domain or f"{secrets.token_hex(6)}.ngrok-free.app",
        domain=domain,
        host_header=header,
        credentials=_credentials(options["basic_auth"]) if "basic_auth" in options else (),
        inspect=inspect,
        metadata=_text(options, "metadata") or _text(options, "description"),
    )
