"""The fake agent's log: ngrok's logfmt or JSON records, one per line, secrets blanked.

pyngrok parses these lines (``lvl``, ``msg``, ``err``, ``addr``) to follow the agent's
start-up, so the keys and the quoting are those of the real agent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TextIO

__all__ = ["LEVELS", "AgentLog", "level_name"]

LEVELS = ("dbug", "info", "warn", "eror", "crit")
_ALIASES = {"debug": "dbug", "warning": "warn", "error": "eror", "err": "eror", "critical": "crit"}
_HIDDEN = "********"
# Shorter strings would blank ordinary words ("t" in "tunnel session started"), and no
# secret gets into a record anyway: this is a safety net. ngrok's secrets are longer.
_MIN_SECRET = 8


def level_name(text: str) -> str:
    """ngrok's spelling of a ``--log-level`` value; ValueError when there is none."""
    name = _ALIASES.get(text.lower(), text.lower())
    if name not in LEVELS:
        raise ValueError(f"invalid log level {text!r}")
    return name


def _quote(value: str) -> str:
    """A logfmt value, quoted and escaped like Go's log15 when it has to be."""
    if value and all(c > " " and c not in '="\\' and c.isprintable() for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


class AgentLog:
    """Thread-safe record writer; a value holding a registered secret is never printed."""

    def __init__(self, stream: TextIO | None, fmt: str = "logfmt", level: str = "info") -> None:
        self._stream = stream
        self._json = fmt == "json"
        self._min = LEVELS.index(level_name(level))
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def hide(self, *secrets: str | None) -> None:
        """Blank these strings wherever they would appear in a later record."""
        with self._lock:
            self._secrets.update(s for s in secrets if s and len(s) >= _MIN_SECRET)

    def __call__(self, lvl: str, msg: str, **fields: object) -> None:
        if self._stream is None or LEVELS.index(lvl) < self._min:
            return
        record = {"t": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lvl": lvl, "msg": msg}
        record.update({key: "nil" if v is None else str(v) for key, v in fields.items()})
        with self._lock:
            for key, value in record.items():
                for secret in self._secrets:
                    value = value.replace(secret, _HIDDEN)
                record[key] = value
            if self._json:
                line = json.dumps(record)
            else:
                line = " ".join(f"{key}={_quote(value)}" for key, value in record.items())
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                # The reader is gone: die like the Go agent does on SIGPIPE, proxies with it.
                os._exit(1)
