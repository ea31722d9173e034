"""The Celery configuration producers and workers must share to talk to each other safely."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

from avocado_shared.overrides.failover import FailoverAMQP
from avocado_shared.settings import Settings
from avocado_shared.tls import broker_ssl, redis_ssl, warn_if_plaintext
from avocado_shared.topology import (
    EMBED_TASK,
    GENERATE_TASK,
    ML_EXCHANGE,
    SUMMARIZE_TASK,
    job_queues,
    task_routes,
)

__all__ = ["celery_config", "make_celery"]


def _task_queues(settings: Settings) -> tuple[Queue, ...]:
    """The job queues, used without being declared when the user may not declare them."""
    queues = job_queues(settings)
    for queue in queues:
        queue.no_declare = not settings.declare_topology  # type: ignore[attr-defined]
    return queues


_RESULT_BACKEND = "avocado_shared.overrides.result_backend:FleetRedisBackend"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Late acks, prefetch 1, confirms, JSON only, time limits under the consumer timeout,
    TLS verified wherever a URL asks for it."""
    for url in settings.broker_urls:
        warn_if_plaintext(url, "broker")
    warn_if_plaintext(settings.result_backend, "result backend")
    warn_if_plaintext(settings.redis_url.get_secret_value(), "Redis")
    return {
        "broker_url": settings.broker_url.get_secret_value(),
        "broker_use_ssl": broker_ssl(settings),
        "result_backend": settings.result_backend,
        # Celery's loader takes these in place of its own Redis result backend.
        "override_backends": dict.fromkeys(("redis", "rediss"), _RESULT_BACKEND),
        "redis_backend_use_ssl": redis_ssl(settings, settings.result_backend),
        "result_backend_transport_options": {
            "global_keyprefix": settings.key_prefix,
            # A producer learns in seconds that Redis is down (PublishError), not in 20.
            "retry_policy": {
                "max_retries": 3,
                "interval_start": 0,
                "interval_step": 0.5,
                "interval_max": 1,
            },
        },
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"confirm_publish": True},
        "broker_pool_limit": 10,  # Flower holds two per broadcast and runs several at once
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        # Topology: topic exchanges (native delayed delivery needs them) and quorum queues.
        "task_queues": _task_queues(settings),
        "task_routes": task_routes(),
        "task_default_exchange": ML_EXCHANGE.name,
        "task_default_exchange_type": "topic",
        "task_default_queue_type": "quorum",
        "task_default_delivery_mode": "persistent",
        "worker_detect_quorum_queues": True,
        # A job is acknowledged only once it ended, and goes back if its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # JSON only: a job is data, never pickle.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_expires_s,
        # Redis down: a worker holds its finished job (unacked, row already in ml_results)
        # and keeps trying to store the result until Redis is back, rather than lose it.
        "result_backend_always_retry": True,
        "result_backend_max_sleep_between_retries_ms": 5000,
        # Per job, the result backend holds the outcome only (no STARTED state, no extended
        # fields: ml_results has both) and nobody publishes task events unless asked to.
        # Each of these costs a confirmed publish or a Redis read and write per job
        # (BENCHMARKS.md); Flower turns events on in the workers it watches by itself.
        "result_extended": False,
        "task_track_started": False,
        "task_send_sent_event": settings.task_events,
        "worker_send_task_events": settings.task_events,
        "task_annotations": {
            GENERATE_TASK: {
                "soft_time_limit": settings.generate_soft_time_limit_s,
                "time_limit": settings.generate_time_limit_s,
            },
            SUMMARIZE_TASK: {
                "soft_time_limit": settings.summarize_soft_time_limit_s,
                "time_limit": settings.summarize_time_limit_s,
            },
            EMBED_TASK: {
                "soft_time_limit": settings.embed_soft_time_limit_s,
                "time_limit": settings.embed_time_limit_s,
            },
        },
        "enable_utc": True,
        # celery-singleton: job locks in Redis, under our prefix, always with an expiry.
        "singleton_backend_url": settings.redis_url.get_secret_value(),
        "singleton_backend_kwargs": redis_ssl(settings, settings.redis_url.get_secret_value()),
        "singleton_key_prefix": f"{settings.key_prefix}lock:",
        "singleton_lock_expiry": settings.lock_expiry_s,
        # Ours: how long a confirmed publish of the fleet's own code (dead letters) may take.
        "avocado_publish_timeout_s": settings.publish_timeout_s,
    }


def make_celery(main: str, settings: Settings, app_class: type[Celery] = Celery) -> Celery:
    """A Celery app configured for the fleet; producers and workers both start from this
    (a worker with an ``app_class`` of its own)."""
    app = app_class(main, set_as_current=False, amqp=FailoverAMQP)
    app.config_from_object(celery_config(settings))
    return app
