"""What a job's lock is keyed on and the scripts that touch a lock only while it is its own.

The locks themselves are celery-singleton's, changed in ``overrides.singleton``.
"""

from __future__ import annotations

from typing import Any

from avocado_shared.topology import EMBED_TASK, GENERATE_TASK, SUMMARIZE_TASK

__all__ = ["REFRESH_SCRIPT", "RELEASE_SCRIPT", "job_identity", "unsure_key"]

# Delete or refresh a lock only while it still names this job.
RELEASE_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
)
REFRESH_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('expire', KEYS[1], ARGV[2]) end"
)


def unsure_key(lock: str) -> str:
    """Where a lock's job id is kept while its publish has an unknown outcome."""
    return f"{lock}:unsure"


def job_identity(task_name: str, kwargs: Any) -> str | None:
    """What makes two submissions the same job: the share id of a summary, the
    idempotency key of a generation, either of an embedding (the share id first).
    ``None``: the job is never deduplicated."""
    request = kwargs.get("request") if isinstance(kwargs, dict) else None
    if not isinstance(request, dict):
        return None
    if task_name == SUMMARIZE_TASK:
        value = request.get("share_id")
    elif task_name == GENERATE_TASK:
        value = request.get("idempotency_key")
    elif task_name == EMBED_TASK:
        value = request.get("share_id") or request.get("idempotency_key")
    else:
        return None
    return value if isinstance(value, str) and value else None
