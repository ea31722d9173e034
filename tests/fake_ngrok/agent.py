"""A fake ngrok v3 agent that pyngrok starts and drives like the real one, with no internet.

``<fake_ngrok_path()> start --none --log stdout --config ngrok.yml`` prints the agent's
start-up log lines, serves its local API (/api/tunnels, /api/endpoints, /api/status) and
runs each tunnel as a loopback HTTP proxy whose "public" URL is ``http://127.0.0.1:<port>``.
Without an authtoken it fails as ngrok does (ERR_NGROK_4018); ``FAKE_NGROK_OFFLINE=1``
fails as if the ngrok cloud were unreachable, ``FAKE_NGROK_OFFLINE=retry`` keeps
retrying like the real agent does. One process, threads only: killing it kills its tunnels.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tests.fake_ngrok._api import ApiServer, Tunnels
from tests.fake_ngrok._config import AgentConfig, ConfigError, default_path, load, save
from tests.fake_ngrok._log import AgentLog

__all__ = ["VERSION", "main"]

VERSION = "3.24.0"
_VALUE_FLAGS = frozenset(
    {"config", "log", "log-format", "log-level", "authtoken", "region", "api-key", "channel"}
)
_BOOL_FLAGS = frozenset({"none", "all", "version", "help"})
_SHORT_FLAGS = {"-v": "version", "-h": "help"}
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_RETRY_SECONDS = 0.5
_AUTH_FAILED = (
    "authentication failed: Usage of ngrok requires a verified account and authtoken.\n\n"
    "Sign up for an account: https://dashboard.ngrok.com/signup\n"
    "Install your authtoken: https://dashboard.ngrok.com/get-started/your-authtoken\r\n\r\n"
    "ERR_NGROK_4018\r\n"
)
_DIAL_FAILED = (
    'failed to dial ngrok server with address "connect.ngrok-agent.com:443": '
    "dial tcp: lookup connect.ngrok-agent.com: no such host"
)
_USAGE = f"""ngrok (fake, tests/fake_ngrok) {VERSION}

Commands:
  start --none         run the agent; tunnels are started through its API
  config add-authtoken TOKEN | add-api-key KEY | check
  version, update
Flags: --config PATH[,PATH] --log stdout|stderr|false|PATH --log-format logfmt|json|term
       --log-level debug|info|warn|error|crit --authtoken TOKEN --region REGION
"""


class _UsageError(Exception):
    """The command line is not one the fake (or ngrok) accepts."""


@dataclass
class _Cli:
    words: list[str] = field(default_factory=list)
    flags: dict[str, list[str]] = field(default_factory=dict)

    def value(self, name: str) -> str | None:
        values = self.flags.get(name)
        return values[-1] if values else None

    def has(self, name: str) -> bool:
        return name in self.flags


def _parse(argv: Sequence[str]) -> _Cli:
    """ngrok's flags, in ``--flag value`` or ``--flag=value`` form, anywhere on the line."""
    cli = _Cli()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            cli.words.extend(args)
        elif arg in _SHORT_FLAGS:
            cli.flags.setdefault(_SHORT_FLAGS[arg], []).append("true")
        elif not arg.startswith("--"):
            cli.words.append(arg)
        else:
            name, eq, value = arg[2:].partition("=")
            if name not in _VALUE_FLAGS | _BOOL_FLAGS:
                raise _UsageError(f"unknown flag: --{name}")
            if name in _VALUE_FLAGS and not eq:
                value = next(args, None) or ""
                if not value:
                    raise _UsageError(f"flag needs an argument: --{name}")
            cli.flags.setdefault(name, []).append(value or "true")
    return cli


def _error(text: str) -> int:
    """Print like the agent does on stderr and give its exit status."""
    for line in text.replace("\r", "").splitlines() or [""]:
        print(f"ERROR:  {line}", file=sys.stderr)
    return 1


def _config_paths(cli: _Cli) -> tuple[list[Path], bool]:
    given = [Path(p) for v in cli.flags.get("config", []) for p in v.split(",") if p]
    return (given, True) if given else ([default_path()], False)


def _log_stream(target: str) -> TextIO | None:
    if target in ("", "false", "none"):
        return None
    if target in ("stdout", "stderr"):
        return sys.stdout if target == "stdout" else sys.stderr
    return open(target, "a", encoding="utf-8")  # lives as long as the agent


def _open_log(cli: _Cli, config: AgentConfig) -> AgentLog:
    fmt = cli.value("log-format") or config.log_format or "logfmt"
    if fmt not in ("logfmt", "json", "term"):
        raise ValueError(f"invalid log format {fmt!r}")
    level = cli.value("log-level") or config.log_level or "info"
    return AgentLog(_log_stream(cli.value("log") or config.log or "false"), fmt, level)


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ValueError(f"invalid web_addr {addr!r}")
    return host, int(port)


def _start_session(log: AgentLog, authtoken: str | None) -> int | None:
    """None once the session is up; otherwise the exit status, after ngrok's error lines."""
    offline = os.environ.get("FAKE_NGROK_OFFLINE", "")
    err = _DIAL_FAILED if offline not in ("", "0") else None if authtoken else _AUTH_FAILED
    if err is None:
        log("info", "client session established", obj="tunnels.session")
        log("info", "tunnel session started", obj="tunnels.session")
        return None
    session = secrets.token_hex(6)
    while True:
        log("eror", "failed to reconnect session", obj="tunnels.session", id=session, err=err)
        if offline != "retry":
            return _error(err)
        if signal.sigtimedwait(_STOP_SIGNALS, _RETRY_SECONDS) is not None:
            return 0


def _start(cli: _Cli, names: list[str]) -> int:
    if names or cli.has("all") or not cli.has("none"):
        return _error("the fake ngrok agent runs `start --none` only; start tunnels by its API")
    # Blocked before any thread starts, so only sigwait() below ever sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    paths, explicit = _config_paths(cli)
    try:
        config = load(paths, explicit=explicit)
        log = _open_log(cli, config)
        host, port = _split_addr(config.web_addr or "127.0.0.1:0")
    except (ConfigError, ValueError, OSError) as exc:
        return _error(str(exc))
    authtoken = cli.value("authtoken") or os.environ.get("NGROK_AUTHTOKEN") or config.authtoken
    log.hide(authtoken, cli.value("api-key") or config.api_key)
    for path in paths:
        if explicit or path.exists():
            log("info", "open config file", path=path, err=None)

    tunnels = Tunnels(log)
    api = None
    try:
        if config.web_addr != "":
            status = {
                "status": "online",
                "agent_version": VERSION,
                "session": {"region": cli.value("region") or "us"},
            }
            try:
                api = ApiServer(host, port, tunnels, log, status)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                err = f"listen tcp {host}:{port}: bind: {reason}"
                log("eror", "failed to start web service", obj="web", err=err)
                return _error(err)
            shown = f"[{host}]" if ":" in host else host
            addr = f"{shown}:{api.server_address[1]}"
            log("info", "starting web service", obj="web", addr=addr, allow_hosts="[]")
        failed = _start_session(log, authtoken)
        if failed is not None:
            return failed
        signum = signal.sigwait(_STOP_SIGNALS)
        log("info", "received stop request", obj="app", signal=signal.Signals(signum).name)
    finally:
        tunnels.stop_all()
        if api is not None:
            api.close()
    return 0


def _config_command(cli: _Cli, words: list[str]) -> int:
    paths, _ = _config_paths(cli)
    path = paths[0]
    if words[:1] == ["check"]:
        try:
            load(paths, explicit=True)
        except ConfigError as exc:
            return _error(str(exc))
        print(f"Valid configuration file at {path}")
        return 0
    saved = {"add-authtoken": ("authtoken", "Authtoken"), "add-api-key": ("api_key", "API key")}
    if len(words) != 2 or words[0] not in saved:
        return _error(f"unknown config command {' '.join(words[:1])!r} for the fake ngrok")
    key, label = saved[words[0]]
    try:
        save(path, key, words[1])
    except (ConfigError, OSError) as exc:
        return _error(str(exc))
    print(f"{label} saved to configuration file: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher's entry point: the ngrok commands pyngrok runs, and ``start`` until SIGTERM."""
    try:
        cli = _parse(sys.argv[1:] if argv is None else argv)
    except _UsageError as exc:
        return _error(str(exc))
    command, rest = (cli.words[0], cli.words[1:]) if cli.words else ("", [])
    if cli.has("version") or command == "version":
        print(f"ngrok version {VERSION}")
        return 0
    if cli.has("help") or command in ("", "help"):
        print(_USAGE, end="")
        return 0
    if command == "update":
        print("No update available, this is the latest version.")
        return 0
    if command == "config":
        return _config_command(cli, rest)
    if command == "start":
        return _start(cli, rest)
    return _error(f'unknown command "{command}" for "ngrok"')


if __name__ == "__main__":
    raise SystemExit(main())
