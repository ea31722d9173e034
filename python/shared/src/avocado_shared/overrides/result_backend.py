"""Celery's Redis result backend, storing a job's outcome in one round trip, and never
missing one while its waiters reconnect.

Celery 5.7's ``BaseKeyValueStoreBackend._store_result`` reads the task's meta first (a GET:
a result that is SUCCESS already is never overwritten, so a lost copy of a job cannot
replace it), then ``RedisBackend._set`` writes it and publishes it to waiting clients in a
MULTI/EXEC: two round trips per outcome, one per job on the worker's hot path. Here one
script does the same three steps in Redis, atomically.

When its subscription to Redis was lost, Celery's result consumer reads the results stored
meanwhile (MGET), then subscribes again: a result stored and published between the two
reaches no one, and its waiter times out. Here it subscribes first: Redis has the SUBSCRIBE
(sent first) by the time it answers the MGET, so a result is either read or published to it.

When Redis stays away through Celery's three reconnect attempts (1.5 s here), Celery's
consumer logs CRITICAL that the application must be restarted and raises RuntimeError: a
client waiting on a job through a Redis restart got an error for a job that then succeeded.
Here the connection is marked lost and a waiter tries again at each of its polls, until its
own timeout; once reconnected it reads what was stored meanwhile, as above.

A handle dropped while Redis is away unsubscribes from its channel in ``AsyncResult.__del__``,
on whatever thread the garbage collector runs (a gateway's event loop, say), and Celery
reconnected there, with the same retries and the same error, once per handle. No UNSUBSCRIBE
is needed: the lost connection took the subscription with it. Here such an unsubscribe gives
up at once and leaves the reconnect to the next waiter.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, ResultConsumer
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.commands.core import Script

__all__ = ["FleetRedisBackend", "FleetResultConsumer"]

logger = logging.getLogger(__name__)

# KEYS[1]: the meta's key; ARGV[1]: the meta (JSON), ARGV[2]: its expiry in seconds (0: none).
_STORE = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, meta = pcall(cjson.decode, old)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1])
else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class FleetResultConsumer(ResultConsumer):  # type: ignore[misc]
    """Celery's result consumer, subscribed again before it reads what was stored while it
    was not, waiting through a Redis restart, and letting a dropped handle go without
    reconnecting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsubscribing = threading.local()
        self._lost = False  # the connection broke and no reconnect has worked since

    def drain_events(self, timeout: float | None = None) -> None:
        if self._lost:
            self._reconnect()  # the retry policy's intervals (1.5 s) are this poll's wait
            if self._lost:
                return
        super().drain_events(timeout)

    def _flush_pending_unsubscribe(self) -> None:
        outer = getattr(self._unsubscribing, "active", False)
        self._unsubscribing.active = True
        try:
            super()._flush_pending_unsubscribe()
        finally:
            self._unsubscribing.active = outer

    def _reconnect(self) -> None:
        self._lost = True
        if getattr(self._unsubscribing, "active", False):
            return  # the connection went with the subscription: the next waiter reconnects
        try:
            super()._reconnect()
        except self._connection_errors as error:
            logger.warning("Redis result channel still lost, a waiter tries again: %s", error)
            return
        self._lost = False

    def _reconnect_pubsub(self) -> None:
        with self._locked():  # reentrant: Celery's own, below, takes it too
            # Cancels queued so far were never subscribed on the new connection.
            self.subscribed_to -= self._pending_unsubscribe
            self._pending_unsubscribe.clear()
            if not self.subscribed_to:  # nothing to read: Celery's connects and waits
                super()._reconnect_pubsub()
                return
            self._pubsub = None
            self.backend.client.connection_pool.reset()
            self._pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(*self.subscribed_to)
            for meta in self.backend.client.mget(self.subscribed_to):
                if meta:  # its cancel goes out on the new connection when the lock is let go
                    self.on_state_change(self._decode_result(meta), None)


class FleetRedisBackend(RedisBackend):  # type: ignore[misc]
    """``RedisBackend`` whose ``_store_result`` is one script (JSON results only: the script
    reads the stored status; any other serializer takes Celery's own two round trips), and
    whose waiters subscribe again before reading (``FleetResultConsumer``)."""

    ResultConsumer = FleetResultConsumer
    _script: Script | None = None

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.serializer != "json":
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            too_large = "value too large for Redis backend"
            raise BackendStoreError(too_large, state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else None
        if expires is None:
            expires = self.expires
        key = self.get_key_for_task(task_id)
        self.ensure(self._store, (key, value, int(expires or 0)))
        return result

    def _store(self, key: bytes, value: str | bytes, expires: int) -> None:
        if self._script is None:
            self._script = self.client.register_script(_STORE)
        self._script(keys=[key], args=[value, expires], client=self.client)
