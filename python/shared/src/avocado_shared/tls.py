"""TLS to the broker and Redis: the options each client library takes for ``amqps://`` and
``rediss://`` URLs (certificate and host name always verified), a clear error instead of
retries when a certificate does not verify, and a warning for plaintext that leaves the host.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

from avocado_shared.errors import PermanentError
from avocado_shared.settings import Settings

__all__ = [
    "CertificateError",
    "broker_ssl",
    "redis_ssl",
    "refuse_untrusted",
    "warn_if_plaintext",
]

logger = logging.getLogger(__name__)

_TLS_SCHEME = {"amqp": "amqps", "redis": "rediss"}
_warned: set[str] = set()
_warned_lock = threading.Lock()


class CertificateError(PermanentError, ConnectionError):
    """A server's TLS certificate did not verify; a retry would meet the same certificate."""


def broker_ssl(settings: Settings) -> dict[str, Any] | bool:
    """py-amqp's ``ssl`` options for ``amqps://`` brokers, ``False`` for ``amqp://``."""
    if not settings.broker_urls[0].startswith("amqps://"):
        return False
    options: dict[str, Any] = {
        "cert_reqs": ssl.CERT_REQUIRED,
        # None: kombu puts the URL's host here, which turns on py-amqp's host name check.
        "server_hostname": None,
    }
    return options | _files(settings, "ca_certs", "certfile", "keyfile")


def redis_ssl(settings: Settings, url: str) -> dict[str, Any]:
    """redis-py's ``ssl_*`` keyword arguments for a ``rediss://`` URL, none for ``redis://``
    (Celery's result backend and celery-singleton take the same keys)."""
    if not url.startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    return options | _files(settings, "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _files(settings: Settings, ca: str, cert: str, key: str) -> dict[str, str]:
    """The CA file and client certificate of the settings, under one library's key names."""
    paths = {ca: settings.tls_ca_file, cert: settings.tls_cert_file, key: settings.tls_key_file}
    return {name: str(path) for name, path in paths.items() if path is not None}


def refuse_untrusted(error: BaseException, _interval: float = 0.0) -> None:
    """A kombu ``errback``: stop reconnecting at once when the certificate did not verify."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        raise CertificateError(
            f"the broker's TLS certificate did not verify: {cause.verify_message}; check "
            "AVOCADO_TLS_CA_FILE and that the URL names a host the certificate is for"
        ) from error


def warn_if_plaintext(url: str, what: str) -> None:
    """Log once per process and address when ``url`` is ``amqp://`` or ``redis://`` to a host
    that is not loopback: its password and jobs would cross the network in clear."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in _TLS_SCHEME or not host or _is_loopback(host):
        return
    where = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    with _warned_lock:
        if where in _warned:
            return
        _warned.add(where)
    logger.warning(
        "%s %s is plaintext across the network: use %s:// (docs/configuration.md, TLS)",
        what,
        where,
        _TLS_SCHEME[parts.scheme],
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")
