"""This host's public endpoint: opened, checked for real, kept in the registry, announced.

A thread of the worker's main process. It opens the endpoint (an ngrok tunnel or a fixed
public URL), checks it with the credentials before announcing (Ollama's ``/api/version``, or
an OpenAI-compatible server's ``/v1/models``), and then every ``node_refresh_s`` checks it
again and refreshes the registry record. When the endpoint stops answering it is reopened
and the new URL announced, the old one removed.
Jobs never wait on any of this: a node that cannot expose itself still serves the queues.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import Celery

from avocado_shared.discovery import Endpoint, EndpointEvent, publish_announcement
from avocado_shared.registry import NodeRegistry
from ollama_worker.exposure import Exposure, NodeError
from ollama_worker.settings import WorkerSettings

__all__ = ["Node"]

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 300.0
# ngrok shows free-plan visitors an HTML warning page unless this header is sent.
CALLER_HEADERS = {"ngrok-skip-browser-warning": "true"}


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Node:
    """Keeps this host's endpoint open, checked, registered and announced."""

    def __init__(
        self,
        app: Celery,
        settings: WorkerSettings,
        exposure: Exposure,
        registry: NodeRegistry,
        models: Callable[[], list[str]],
    ) -> None:
        self.app = app
        self._models = models
        self.settings = settings
        self.exposure = exposure
        self.registry = registry
        self.endpoint: Endpoint | None = None
        self._started_at = _utc_now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        password = settings.tunnel_password
        self._auth = (
            httpx.BasicAuth(settings.tunnel_user, password.get_secret_value())
            if password is not None
            else None
        )
        # The exposed URL forwards to the server's port, so the path is the server's own.
        self._check_path = (
            "/api/version"
            if settings.backend == "ollama"
            else f"{urlsplit(settings.server_url).path.rstrip('/')}/models"
        )
        self._http = httpx.Client(timeout=httpx.Timeout(10.0, connect=5.0), headers=CALLER_HEADERS)

    def start(self) -> Node:
        """Run in a daemon thread, so a stuck tunnel never holds up the worker's exit."""
        self._thread = threading.Thread(target=self._run, name="avocado-node", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Withdraw at once: registry record deleted, removal announced, endpoint closed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        try:
            self.registry.remove(self.settings.service_id)
            if self.endpoint is not None:
                self._announce(self.endpoint, EndpointEvent.REMOVED)
        except Exception as error:  # the record expires on its own in node_ttl_s
            logger.warning("could not withdraw %s: %s", self.settings.service_id, error)
        finally:
            self.exposure.close()
            self._http.close()
            self.registry.close()

    def _run(self) -> None:
        """Tick every ``node_refresh_s``; after failures back off, up to five minutes."""
        delay = self.settings.node_refresh_s
        while not self._stop.is_set():
            try:
                self.tick()
                delay = self.settings.node_refresh_s
            except Exception as error:
                delay = min(delay * 2, _MAX_BACKOFF_S)
                logger.warning(
                    "endpoint of %s: %s (next try in %.0fs)", self.settings.service_id, error, delay
                )
            self._stop.wait(delay)

    def tick(self) -> None:
        """One round: reopen when the endpoint does not answer, then refresh the record."""
        if self.endpoint is None or self._answers(self.endpoint.url) is None:
            self._reopen()
            return
        self.endpoint = self.endpoint.model_copy(update={"updated_at": _utc_now()})
        self.registry.put(self.endpoint)

    def _reopen(self) -> None:
        old = self.endpoint
        url = self.exposure.open()
        answer = self._answers(url)
        if answer is None:
            raise NodeError(f"{url} does not answer {self._check_path}: not announced")
        self.endpoint = Endpoint(
            service_id=self.settings.service_id,
            url=url,
            auth="basic" if self._auth is not None else "none",
            headers=CALLER_HEADERS,
            backend=self.settings.backend,
            models=self._models(),
            version=(
                str(answer.get("version") or "unknown")
                if self.settings.backend == "ollama"
                else None
            ),
            worker=self.settings.worker_id,
            started_at=self._started_at,
            updated_at=_utc_now(),
            ttl_s=self.settings.node_ttl_s,
        )
        self.registry.put(self.endpoint)
        if old is not None and old.url != url:
            self._announce(old, EndpointEvent.REMOVED)
        self._announce(self.endpoint, EndpointEvent.CHANGED)
        logger.info("%s announced at %s", self.settings.service_id, url)

    def _answers(self, url: str) -> dict[str, Any] | None:
        """The server's JSON answer to the check path through ``url``, asked with the
        caller's credentials, as a caller would; None if it does not answer."""
        try:
            response = self._http.get(
                f"{url}{self._check_path}", auth=self._auth or httpx.USE_CLIENT_DEFAULT
            )
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as error:
            logger.info("%s does not answer: %s", url, error)
            return None
        return body if isinstance(body, dict) else None

    def _announce(self, endpoint: Endpoint, event: EndpointEvent) -> None:
        with self.app.connection_for_write() as connection:
            publish_announcement(
                connection, endpoint, event, timeout=self.settings.publish_timeout_s
            )
