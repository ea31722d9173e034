"""How a host makes its inference server reachable from outside: the ``Exposure`` a node
keeps open (an ngrok tunnel, or a URL the host already has)."""

from __future__ import annotations

from typing import Protocol

from avocado_shared.errors import TransientError
from ollama_worker.settings import WorkerSettings

__all__ = ["Exposure", "FixedURL", "NodeError", "exposure"]


class NodeError(TransientError):
    """The endpoint cannot be opened or does not answer; the node tries again later."""


class Exposure(Protocol):
    """A way to make the local inference server reachable from outside."""

    def open(self) -> str:
        """Open (or reopen) and return the public URL."""

    def close(self) -> None:
        """Stop exposing; idempotent."""


class FixedURL:
    """A host that is reachable already (a VM with a public address, a reverse proxy)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def open(self) -> str:
        return self.url

    def close(self) -> None:
        return None


def exposure(settings: WorkerSettings) -> Exposure:
    """The public URL when one is set, else an ngrok tunnel (pyngrok loads only then)."""
    if settings.public_url:
        return FixedURL(settings.public_url)
    from ollama_worker.tunnel import Tunnel

    return Tunnel(settings)
