"""An ngrok tunnel to the local Ollama, driven by pyngrok.

The Host header is rewritten to ``localhost:<port>`` (Ollama answers 403 to other hosts)
and the tunnel is behind basic auth. The authtoken goes into a private config file, never
on the agent's command line where ``ps`` would show it (pyngrok puts it there when told).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pyngrok import conf, ngrok
from pyngrok.exception import PyngrokError

from ollama_worker.exposure import NodeError
from ollama_worker.settings import WorkerSettings

__all__ = ["Tunnel"]

logger = logging.getLogger(__name__)
# pyngrok logs every agent line, one per proxied connection at INFO: keep the worker log readable.
logging.getLogger("pyngrok.process.ngrok").setLevel(logging.WARNING)


class Tunnel:
    """Opens (and reopens) one tunnel with a fresh agent; ``close`` stops the agent."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        server = urlsplit(settings.server_url)  # Ollama, or the OpenAI-compatible server
        self.port = server.port or (11434 if settings.backend == "ollama" else 80)
        self._config = conf.PyngrokConfig(
            ngrok_path=settings.ngrok_path or conf.DEFAULT_NGROK_PATH,
            config_path=str(self._private_config()),
            config_version="2",  # the tunnels API, where basic_auth and host_header are fields
            startup_timeout=20,
        )
        self._config.auth_token = None  # pyngrok would read NGROK_AUTHTOKEN onto argv

    def _private_config(self) -> Path:
        """The agent's config file, readable by this user only; it holds the authtoken."""
        folder = Path(tempfile.gettempdir()) / f"avocado-ngrok-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{self.settings.service_id}.yml"
        token = self._token()
        lines = ['version: "2"']
        if token:
            lines.append(f"authtoken: {token}")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write("\n".join(lines) + "\n")
        return path

    def _token(self) -> str:
        token = self.settings.ngrok_authtoken
        return token.get_secret_value().strip() if token is not None else ""

    def open(self) -> str:
        """Stop any agent of ours, start a new one with one tunnel; its public URL."""
        if not self._token():
            raise NodeError(
                "no tunnel: NGROK_AUTHTOKEN is not set (get one at "
                "https://dashboard.ngrok.com/get-started/your-authtoken); jobs are still served"
            )
        self.close()
        password = self.settings.tunnel_password
        assert password is not None  # WorkerSettings refuses a tunnel without one
        options: dict[str, Any] = {
            "basic_auth": [f"{self.settings.tunnel_user}:{password.get_secret_value()}"],
            "host_header": f"localhost:{self.port}",
        }
        if self.settings.ngrok_domain:
            options["domain"] = self.settings.ngrok_domain
        try:
            tunnel = ngrok.connect(str(self.port), "http", pyngrok_config=self._config, **options)
        except PyngrokError as error:
            self.close()
            raise NodeError(f"no tunnel to port {self.port}: {_first_line(error)}") from None
        if tunnel.public_url is None:
            raise NodeError("the ngrok agent opened a tunnel without a public URL")
        logger.info("tunnel %s -> localhost:%d", tunnel.public_url, self.port)
        return str(tunnel.public_url)

    def close(self) -> None:
        """Stop our agent and its tunnels; nothing when none runs."""
        try:
            ngrok.kill(pyngrok_config=self._config)
        except PyngrokError as error:
            logger.warning("stopping the ngrok agent: %s", _first_line(error))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
