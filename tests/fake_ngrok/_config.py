"""The agent's YAML configuration: the few keys the fake honours, read as ngrok v3 reads them.

A version "3" file keeps agent settings under ``agent:``; a version "2" file keeps them
at the top level. Several ``--config`` files are merged, later ones winning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

__all__ = ["AgentConfig", "ConfigError", "default_path", "load", "save"]


class ConfigError(Exception):
    """A configuration file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class AgentConfig:
    """What the fake takes from the files; ``web_addr`` "" means the API is disabled."""

    authtoken: str | None = None
    api_key: str | None = None
    web_addr: str | None = None
    log: str | None = None
    log_level: str | None = None
    log_format: str | None = None


def default_path() -> Path:
    """Where ngrok v3 keeps its configuration on Linux."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ngrok" / "ngrok.yml"


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"open {path}: {(exc.strerror or str(exc)).lower()}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Error reading configuration file '{path}': {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Error reading configuration file '{path}': not a YAML mapping")
    return data


def _is_v3(data: dict[str, Any]) -> bool:
    return str(data.get("version", "2")) == "3"


def _web_addr(value: object) -> str | None:
    if value is None:
        return None
    if value is False:
        return ""
    text = str(value).strip()
    return f"127.0.0.1:{text}" if text.isdigit() else text


def load(paths: list[Path], *, explicit: bool) -> AgentConfig:
    """Merge the files; a missing default file is fine, a missing explicit one is not."""
    merged: dict[str, Any] = {}
    for path in paths:
        if not explicit and not path.exists():
            continue
        data = _read(path)
        section = data.get("agent") if _is_v3(data) else data
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"Error reading configuration file '{path}': 'agent' is no mapping")
        merged.update(section or {})

    def text(key: str) -> str | None:
        value = merged.get(key)
        return None if value is None else str(value)

    return AgentConfig(
        authtoken=text("authtoken"),
        api_key=text("api_key"),
        web_addr=_web_addr(merged.get("web_addr")),
        log=text("log"),
        log_level=text("log_level"),
        log_format=text("log_format"),
    )


def save(path: Path, key: str, value: str) -> None:
    """Set one agent setting, like ``ngrok config add-authtoken``; the file stays 0600."""
    data: dict[str, Any] = _read(path) if path.exists() else {"version": "3"}
    if _is_v3(data):
        agent = data.get("agent")
        data["agent"] = {**(agent if isinstance(agent, dict) else {}), key: value}
    else:
        data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(data, out, default_flow_style=False)
