"""celery-singleton's locks keyed on a job's identity, so a job sent twice runs once.

Three fixes to celery-singleton 0.3.1: a retry re-publishes for real instead of finding its
own lock and returning (the job would stop in RETRY), unlock only deletes a lock its own job
holds, and every lock expires (``lock_expiry_s``) so a dead worker cannot hold one forever.
Its Redis pool, one per process and never closed there, is here each task's, closed by
``close_lock_store``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Celery, Task
from celery.utils import uuid
from celery_singleton import Singleton
from celery_singleton.backends import RedisBackend
from celery_singleton.config import Config
from redis.exceptions import RedisError

from avocado_shared.flow import SentUnconfirmed, maybe_sent
from avocado_shared.locks import REFRESH_SCRIPT, RELEASE_SCRIPT, job_identity, unsure_key
from avocado_shared.topology import JOB_TASKS

__all__ = ["SingletonJob", "close_lock_store", "new_lock_store", "register_job_tasks"]

logger = logging.getLogger(__name__)


def new_lock_store(app: Celery) -> RedisBackend:
    """A celery-singleton lock store of ``app``'s configuration, with a Redis pool of its own."""
    config = Config(app)
    return config.backend_class(config.backend_url, **config.backend_kwargs)


def close_lock_store(store: RedisBackend) -> None:
    """Close a lock store's pool (celery-singleton's backends have no ``close``)."""
    store.redis.close()


class SingletonJob(Singleton):  # type: ignore[misc]
    """A job task whose identity is locked in Redis from publish until it ends."""

    abstract = True
    _singleton_backend: Any = None

    @property
    def singleton_backend(self) -> Any:
        """This task's lock store, of its own app (celery-singleton keeps one per process,
        the first app's); made on first use, closed by ``close_lock_store``."""
        if self._singleton_backend is None:
            self._singleton_backend = new_lock_store(self._get_app())
        return self._singleton_backend

    def close_lock_store(self) -> None:
        """Close the lock store this task made, if it made one."""
        store, self._singleton_backend = self._singleton_backend, None
        if store is not None:
            close_lock_store(store)

    def generate_lock(self, task_name: str, task_args: Any = None, task_kwargs: Any = None) -> str:
        identity = job_identity(task_name, task_kwargs)
        return f"{self.singleton_config.key_prefix}{task_name}:{identity}"

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        """Lock and publish; without an identity, or for a retry, publish as a plain task.

        A job whose lock is held is not published again, except when its own publish ended
        with an unknown outcome (``flow.maybe_sent``): then it is published once more under
        the same job id, which workers run once however many copies arrive.
        """
        if options.get("retries") or job_identity(self.name, kwargs) is None:
            # A retry keeps the lock its first run took; re-locking would find it held.
            return Task.apply_async(self, args, kwargs, task_id=task_id, **options)
        lock = self.generate_lock(self.name, args, kwargs)
        mine = task_id or uuid()
        while True:
            if self.aquire_lock(lock, mine):
                return self._publish(lock, args, kwargs, mine, first=True, **options)
            existing = self.get_existing_task_id(lock)
            if existing is None:
                continue  # released since: try to take it
            if self.singleton_backend.redis.get(unsure_key(lock)) == existing:
                return self._publish(lock, args, kwargs, existing, first=False, **options)
            return self.AsyncResult(existing)

    def _publish(
        self, lock: str, args: Any, kwargs: Any, task_id: str, *, first: bool, **options: Any
    ) -> Any:
        """Publish under a held lock; on failure keep what a later submission must know."""
        redis = self.singleton_backend.redis
        try:
            result = Task.apply_async(self, args, kwargs, task_id=task_id, **options)
        except Exception as error:
            sent = maybe_sent(error)
            with contextlib.suppress(RedisError):  # then the lock expires by itself
                if sent:
                    redis.set(unsure_key(lock), task_id, ex=self.singleton_config.lock_expiry)
                elif first:  # nothing of this job is queued: the next submission starts afresh
                    redis.eval(RELEASE_SCRIPT, 1, lock, task_id)
            if sent:
                raise SentUnconfirmed(task_id) from error
            raise
        if not first:
            redis.delete(unsure_key(lock))
        return result

    def release_lock(self, task_args: Any = None, task_kwargs: Any = None) -> bool:
        """Release this job's lock, never another job's that took the same identity since;
        False when Redis could not be reached (the lock then expires by itself)."""
        return self._on_lock(RELEASE_SCRIPT, self.request.id, task_args, task_kwargs)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Push the lock's expiry back when the job starts, however long it waited queued."""
        self._on_lock(REFRESH_SCRIPT, task_id, args, kwargs, self.singleton_config.lock_expiry)

    def _on_lock(self, script: str, task_id: str, args: Any, kwargs: Any, *extra: Any) -> bool:
        """Run a lock script; with Redis down the job goes on and the lock expires by itself."""
        if job_identity(self.name, kwargs) is None:
            return True
        lock = self.generate_lock(self.name, args, kwargs)
        try:
            self.singleton_backend.redis.eval(script, 1, lock, task_id, *extra)
        except RedisError as error:
            logger.warning("lock %s of job %s left to expire: %s", lock, task_id, error)
            return False
        return True


def register_job_tasks(app: Celery) -> None:
    """Give a producer app the job tasks' names and lock behaviour; their bodies run on workers."""

    def remote(*_: Any, **__: Any) -> None:
        raise NotImplementedError("this job runs on an Ollama worker, not in the producer")

    for name in JOB_TASKS:
        app.task(name=name, base=SingletonJob, shared=False)(remote)
