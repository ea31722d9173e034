"""The node registry in Redis: one record per node with a TTL its node keeps refreshing.

``{prefix}node:<service id>`` holds the live record and expires on its own when the node
dies; ``{prefix}nodes`` remembers each node's last record, so whoever sweeps can announce
the removal of a node that expired, and exactly one sweeper does.
"""

from __future__ import annotations

import redis
from pydantic import ValidationError

from avocado_shared.discovery import Endpoint
from avocado_shared.redis_clients import redis_client
from avocado_shared.settings import Settings

__all__ = ["NodeRegistry"]

# Forget a node whose record expired, atomically, and return its last record: of many
# sweepers at once, only one gets it (and announces the removal).
_SWEEP = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local last = redis.call('hget', KEYS[2], ARGV[1])
if last then redis.call('hdel', KEYS[2], ARGV[1]) end
return last
"""


class NodeRegistry:
    """Node records in Redis; every method is one round trip or one script."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._index = f"{key_prefix}nodes"
        self._sweep = client.register_script(_SWEEP)

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeRegistry:
        """The registry on the fleet's Redis, under its key prefix."""
        return cls(redis_client(settings), settings.key_prefix)

    def _key(self, service_id: str) -> str:
        return f"{self.key_prefix}node:{service_id}"

    def put(self, endpoint: Endpoint) -> None:
        """Write or refresh the node's record; it expires ``ttl_s`` from now."""
        data = endpoint.model_dump_json()
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(endpoint.service_id), data, ex=endpoint.ttl_s)
            pipe.hset(self._index, endpoint.service_id, data)
            pipe.execute()

    def remove(self, service_id: str) -> Endpoint | None:
        """Drop the node at once (clean shutdown); its last record, if it had one."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self._index, service_id)
            pipe.delete(self._key(service_id))
            pipe.hdel(self._index, service_id)
            last, _, _ = pipe.execute()
        return _parse(last)

    def get(self, service_id: str) -> Endpoint | None:
        """The node's live record."""
        return _parse(self.client.get(self._key(service_id)))

    def live(self) -> list[Endpoint]:
        """Every live record, by service id."""
        ids = sorted(map(_text, self.client.hkeys(self._index)))
        if not ids:
            return []
        records = self.client.mget([self._key(i) for i in ids])
        return [e for e in map(_parse, records) if e is not None]

    def sweep_expired(self) -> list[Endpoint]:
        """Forget the nodes whose record expired; their last records, to announce removed."""
        gone = []
        for raw in self.client.hkeys(self._index):
            service_id = _text(raw)
            last = _parse(self._sweep(keys=[self._key(service_id), self._index], args=[raw]))
            if last is not None:
                gone.append(last)
        return gone

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _parse(raw: bytes | str | None) -> Endpoint | None:
    if raw is None:
        return None
    try:
        return Endpoint.model_validate_json(raw)
    except ValidationError:
        return None
