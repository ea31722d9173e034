"""Each API key's limits, counted in Redis so that every gateway process shares them.

Requests a minute: a sliding window of the key's admitted requests (a sorted set by time); over
it, ``Retry-After`` is when the oldest request that counts leaves the window. Requests at once:
the key's slots (a sorted set by lease end). A request holds its slot until its response ends,
streamed or not, its client gone or not; the gateway renews the leases of the slots it holds,
so the slots of a gateway that dies free themselves when their lease runs out. Both scripts
read Redis's clock, so gateways on hosts whose clocks differ count alike.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass

import redis
from starlette.concurrency import run_in_threadpool

from avocado_infer.errors import OverLimit
from avocado_shared.keys import ApiKey

__all__ = ["Limiter", "Slot", "requests_key", "slots_key"]

logger = logging.getLogger(__name__)

_WINDOW_MS = 60_000
# A slot frees when one of the key's responses ends, which nothing can foresee: come back soon.
_SLOT_RETRY_S = 1.0

# KEYS: the key's admitted requests (score: when, ms), its slots (score: lease end, ms).
# ARGV: rpm, concurrency (0: none), this request's id, the lease (ms), the window (ms).
# Returns {0, 0} admitted, {1, ms until the window admits one more}, {2, 0} no slot free.
_ADMIT = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, concurrency = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm > 0 then
  redis.call('zremrangebyscore', KEYS[1], '-inf', now - tonumber(ARGV[5]))
  local count = redis.call('zcard', KEYS[1])
  if count >= rpm then
    local frees = redis.call('zrange', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
    return {1, tonumber(frees[2]) + tonumber(ARGV[5]) - now}
  end
end
if concurrency > 0 then
  redis.call('zremrangebyscore', KEYS[2], '-inf', now)
  if redis.call('zcard', KEYS[2]) >= concurrency then return {2, 0} end
  redis.call('zadd', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('pexpire', KEYS[2], ARGV[4])
end
if rpm > 0 then
  redis.call('zadd', KEYS[1], now, ARGV[3])
  redis.call('pexpire', KEYS[1], ARGV[5])
end
return {0, 0}
"""

# KEYS: slot sets; ARGV: the lease (ms), then each slot's id, in the order of KEYS.
_RENEW = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('zadd', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('pexpire', key, ARGV[1])
end
"""


def requests_key(key_prefix: str, key_name: str) -> str:
    """Where the recent requests of the API key named ``key_name`` are counted."""
    return f"{key_prefix}limit:{key_name}:requests"


def slots_key(key_prefix: str, key_name: str) -> str:
    """Where the slots of the API key named ``key_name`` are held."""
    return f"{key_prefix}limit:{key_name}:slots"


@dataclass(frozen=True)
class Slot:
    """One of a key's concurrent slots, held by one request."""

    slots: str  # the Redis key of its key's slots
    id: str


class Limiter:
    """Admits requests within their key's limits and keeps their slots leased."""

    def __init__(self, client: redis.Redis, key_prefix: str, lease_s: float) -> None:
        self._prefix = key_prefix
        self._lease_ms = round(lease_s * 1000)
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self._client = client
        self._held: set[Slot] = set()
        self._lock = threading.Lock()

    def admit(self, key: ApiKey) -> Slot | None:
        """Count a request of ``key``; its slot when the key limits requests at once, to
        ``release`` when the response ends. ``OverLimit`` when the key is over a limit."""
        if not key.rpm and not key.concurrency:
            return None
        slot = Slot(slots_key(self._prefix, key.name), uuid.uuid4().hex)
        refused, wait_ms = self._admit(
            keys=[requests_key(self._prefix, key.name), slot.slots],
            args=[key.rpm, key.concurrency, slot.id, self._lease_ms, _WINDOW_MS],
        )
        if refused == 1:
            raise OverLimit(
                f"key {key.name!r} is over its {key.rpm} requests a minute",
                retry_after=int(wait_ms) / 1000,
            )
        if refused == 2:
            raise OverLimit(
                f"key {key.name!r} has its {key.concurrency} requests at once running",
                retry_after=_SLOT_RETRY_S,
            )
        if not key.concurrency:
            return None
        with self._lock:
            self._held.add(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """Free ``slot``; if Redis does not answer, its lease runs out instead."""
        with self._lock:
            self._held.discard(slot)
        try:
            self._client.zrem(slot.slots, slot.id)
        except redis.RedisError as error:
            logger.warning("a slot left to expire with its lease: %s", error)

    def renew(self) -> None:
        """Extend the lease of every slot this process holds, in one script."""
        with self._lock:
            held = list(self._held)
        if held:
            self._renew(keys=[s.slots for s in held], args=[self._lease_ms, *[s.id for s in held]])

    async def renewing(self) -> None:
        """Renew the leases every third of their length, until cancelled."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await run_in_threadpool(self.renew)
            except redis.RedisError as error:
                logger.warning("concurrent slots not renewed: %s", error)
