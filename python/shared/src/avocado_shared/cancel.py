"""Cancelling a job: a flag in Redis that the job's worker reads before the job runs and with
every write to its token stream.

A queued job whose flag is set never calls its model; a running generation stops at its next
chunk, and closing its HTTP stream tells the inference server to stop generating (Ollama and
vLLM stop when their client goes away). Either way the job fails for good with
``JobCancelled`` and ``ml_results`` records it as CANCELLED. Celery's own ``revoke`` would
not do: it lives in the memory of the workers running at the time, and the threads pool
cannot stop a running job.
"""

from __future__ import annotations

from redis import Redis
from redis.exceptions import RedisError

from avocado_shared.errors import PermanentError, Unavailable

__all__ = ["JobCancelled", "cancel_key", "request_cancel"]

# The flag outlives any wait in the queue and any run (a job's hard time limit is far less).
_FLAG_TTL_S = 24 * 3600


class JobCancelled(PermanentError):
    """The job was cancelled on request: it never ran, or its generation was cut short."""


def cancel_key(key_prefix: str, job_id: str) -> str:
    """Where the cancel flag of ``job_id`` lives."""
    return f"{key_prefix}cancel:{job_id}"


def request_cancel(client: Redis, key_prefix: str, job_id: str) -> None:
    """Flag ``job_id`` as cancelled; ``Unavailable`` when Redis cannot be reached."""
    try:
        client.set(cancel_key(key_prefix, job_id), "1", ex=_FLAG_TTL_S)
    except RedisError as error:
        raise Unavailable(f"job {job_id} not cancelled, Redis did not answer: {error}") from error
