"""The one way the fleet makes a client of its Redis (``AVOCADO_REDIS_URL``): its timeouts,
and over ``rediss://`` a verified certificate. Whoever calls these owns the client and
closes it."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

from avocado_shared.settings import Settings
from avocado_shared.tls import redis_ssl, warn_if_plaintext

__all__ = ["async_redis_client", "redis_client"]


def redis_client(settings: Settings) -> redis.Redis:
    """A new client of the fleet's Redis, with a connection pool of its own."""
    url, options = _redis_options(settings)
    return redis.Redis.from_url(url, **options)


def async_redis_client(settings: Settings) -> redis.asyncio.Redis:
    """``redis_client`` for an event loop (redis-py's asyncio client)."""
    url, options = _redis_options(settings)
    return redis.asyncio.Redis.from_url(url, **options)


def _redis_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    url = settings.redis_url.get_secret_value()
    warn_if_plaintext(url, "Redis")
    return url, {"socket_timeout": 10, "socket_connect_timeout": 5, **redis_ssl(settings, url)}
