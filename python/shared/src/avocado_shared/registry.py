"""Registries in Redis: one record per member with a TTL its member keeps refreshing.

``{prefix}<kind>:<id>`` holds the live record and expires on its own when the member dies;
``{prefix}<kind>s`` remembers each member's last record. The node registry holds the public
endpoints nodes announce, and whoever sweeps it announces the removal of a node that expired
(exactly one sweeper does).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from avocado_shared.discovery import Endpoint
from avocado_shared.redis_clients import redis_client
from avocado_shared.settings import Settings

__all__ = ["NodeRegistry", "Records"]

_R = TypeVar("_R", bound=BaseModel)

# Forget a node whose record expired, atomically, and return its last record: of many
# sweepers at once, only one gets it (and announces the removal).
_SWEEP = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local last = redis.call('hget', KEYS[2], ARGV[1])
if last then redis.call('hdel', KEYS[2], ARGV[1]) end
return last
"""


class Records(Generic[_R]):
    """Records of one ``kind`` in Redis; every method is one round trip or one script."""

    def __init__(self, client: redis.Redis, key_prefix: str, kind: str, model: type[_R]) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._kind = kind
        self._model = model
        self._index = f"{key_prefix}{kind}s"

    def _key(self, member: str) -> str:
        return f"{self.key_prefix}{self._kind}:{member}"

    def put_record(self, member: str, record: _R, ttl_s: int) -> None:
        """Write or refresh ``member``'s record; it expires ``ttl_s`` from now."""
        data = record.model_dump_json()
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(member), data, ex=ttl_s)
            pipe.hset(self._index, member, data)
            pipe.execute()

    def remove(self, member: str) -> _R | None:
        """Drop the member at once (clean shutdown); its last record, if it had one."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self._index, member)
            pipe.delete(self._key(member))
            pipe.hdel(self._index, member)
            last, _, _ = pipe.execute()
        return self._parse(last)

    def get(self, member: str) -> _R | None:
        """The member's live record."""
        return self._parse(self.client.get(self._key(member)))

    def live(self) -> list[_R]:
        """Every live record, by member id."""
        return [record for record in self._read().values() if record is not None]

    def _read(self) -> dict[str, _R | None]:
        """Each member the index knows, and its live record (None: expired)."""
        ids = sorted(map(_text, self.client.hkeys(self._index)))
        if not ids:
            return {}
        records = self.client.mget([self._key(i) for i in ids])
        return dict(zip(ids, map(self._parse, records), strict=True))

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()

    def _parse(self, raw: bytes | str | None) -> _R | None:
        if raw is None:
            return None
        try:
            return self._model.model_validate_json(raw)
        except ValidationError:
            return None


class NodeRegistry(Records[Endpoint]):
    """The public endpoints nodes announce."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        super().__init__(client, key_prefix, "node", Endpoint)
        self._sweep = client.register_script(_SWEEP)

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeRegistry:
        """The registry on the fleet's Redis, under its key prefix."""
        return cls(redis_client(settings), settings.key_prefix)

    def put(self, endpoint: Endpoint) -> None:
        """Write or refresh the node's record; it expires ``ttl_s`` from now."""
        self.put_record(endpoint.service_id, endpoint, endpoint.ttl_s)

    def sweep_expired(self) -> list[Endpoint]:
        """Forget the nodes whose record expired; their last records, to announce removed."""
        gone = []
        for raw in self.client.hkeys(self._index):
            service_id = _text(raw)
            last = self._parse(self._sweep(keys=[self._key(service_id), self._index], args=[raw]))
            if last is not None:
                gone.append(last)
        return gone


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
