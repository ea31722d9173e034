"""API keys of the HTTP gateway (avocado-infer), kept in Redis under the fleet's key prefix.

A key's secret is ``avk_`` and 32 random bytes, shown once when it is made; Redis keeps only
its SHA-256 digest, beside the key's name and limits. A presented secret is looked up by its
digest: with 256 random bits a fast hash leaves nothing to brute-force, and no secret is ever
compared in Python, so no comparison's timing can leak one (a lookup's timing could only
tell digests of guesses apart).

``{prefix}apikeys`` maps each name to its digest; ``{prefix}apikey:<digest>`` is the record.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import redis
import redis.asyncio

from avocado_shared.contracts import InvalidRequest
from avocado_shared.errors import NotFound, PermanentError
from avocado_shared.redis_clients import redis_client
from avocado_shared.routing import Lane, parse_lane
from avocado_shared.settings import Settings

__all__ = ["ApiKey", "KeyExists", "KeyStore"]

_MARK = "avk_"  # how one of our keys starts, for people and secret scanners to recognise
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Add a key unless its name is taken: the name's entry and the record at once.
_CREATE = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('hset', KEYS[2], 'name', ARGV[1], 'rpm', ARGV[3], 'concurrency', ARGV[4],
           'created_at', ARGV[5], 'lane', ARGV[6], 'admin', ARGV[7])
return 1
"""


class KeyExists(PermanentError):
    """A key of that name exists: revoke it first to make a new one."""


@dataclass(frozen=True)
class ApiKey:
    """A key as the gateway knows it: its name, limits and default lane, never its secret.
    A limit of 0 is no limit; ``lane`` is where its requests go unless they say otherwise
    (``X-Avocado-Lane``); an ``admin`` key sees and cancels every job, not only its own."""

    name: str
    rpm: int
    concurrency: int
    created_at: datetime
    lane: Lane = Lane.INTERACTIVE
    admin: bool = False

    @classmethod
    def _of(cls, record: dict[bytes, bytes]) -> ApiKey:
        return cls(
            name=record[b"name"].decode(),
            rpm=int(record[b"rpm"]),
            concurrency=int(record[b"concurrency"]),
            created_at=datetime.fromisoformat(record[b"created_at"].decode()),
            lane=parse_lane(record.get(b"lane"), Lane.INTERACTIVE),  # keys made before lanes
            admin=record.get(b"admin") == b"1",  # keys made before admin keys are not
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rpm": self.rpm,
            "concurrency": self.concurrency,
            "created_at": self.created_at.isoformat(),
            "lane": self.lane.value,
            "admin": self.admin,
        }


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The gateway's API keys in Redis; every method is one or two round trips."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self._index = f"{key_prefix}apikeys"
        self._records = f"{key_prefix}apikey:"
        self._create = client.register_script(_CREATE)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """The keys in the fleet's Redis, under its key prefix."""
        return cls(redis_client(settings), settings.key_prefix)

    def create(
        self,
        name: str,
        *,
        rpm: int = 0,
        concurrency: int = 0,
        lane: Lane = Lane.INTERACTIVE,
        admin: bool = False,
    ) -> tuple[ApiKey, str]:
        """Make a key; returns it and its secret, which nothing keeps: show it once."""
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"key name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if rpm < 0 or concurrency < 0:
            raise InvalidRequest("a key's limits are 0 (none) or more")
        secret = _MARK + secrets.token_urlsafe(32)
        digest = _digest(secret)
        key = ApiKey(name, rpm, concurrency, datetime.now(timezone.utc), lane, admin)
        made = self._create(
            keys=[self._index, self._records + digest],
            args=[
                name,
                digest,
                rpm,
                concurrency,
                key.created_at.isoformat(),
                lane.value,
                int(admin),
            ],
        )
        if not made:
            raise KeyExists(f"a key named {name!r} exists; revoke it to make a new one")
        return key, secret

    async def verify(self, client: redis.asyncio.Redis, secret: str) -> ApiKey | None:
        """The live key whose secret this is; None for an unknown or revoked one. Read with
        an event loop's client of the same Redis (the gateway's): no hop to a thread on a
        request's way to its first token."""
        record = cast(dict[bytes, bytes], await client.hgetall(self._records + _digest(secret)))
        return ApiKey._of(record) if record else None

    def list(self) -> list[ApiKey]:
        """Every live key, by name."""
        digests = cast(dict[bytes, bytes], self.client.hgetall(self._index))
        with self.client.pipeline(transaction=False) as pipe:
            for digest in digests.values():
                pipe.hgetall(self._records + digest.decode())
            records: list[dict[bytes, bytes]] = pipe.execute()
        return sorted((ApiKey._of(r) for r in records if r), key=lambda k: k.name)

    def revoke(self, name: str) -> None:
        """Delete the key: its secret is refused from the next request on."""
        digest = cast(bytes | None, self.client.hget(self._index, name))
        if digest is None:
            raise NotFound(f"no key named {name!r}")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._records + digest.decode())
            pipe.hdel(self._index, name)
            pipe.execute()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
