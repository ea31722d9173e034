"""Who may read or cancel a job: the API keys it belongs to (those that queued it through a
gateway, noted in the ``Ledger``), and admin keys, which see every job, those queued outside
the gateway (Python API, ``avocado`` CLI: they belong to no key) included. A gateway that asks
for no keys (``AVOCADO_INFER_REQUIRE_KEYS=false``) has no one to tell apart: all see all. A
job a key may not see answers as an unknown one does, so no key learns of another's jobs."""

from __future__ import annotations

from avocado_infer.gateway import Gateway
from avocado_infer.job_state import JobUnknown
from avocado_shared.keys import ApiKey

__all__ = ["check_owner"]


async def check_owner(
    gateway: Gateway, key: ApiKey | None, job_id: str, unknown: JobUnknown
) -> None:
    """Raise ``unknown`` (what the job's route answers for a job it cannot find) unless ``key``
    may see ``job_id``: no key (none asked for), an admin key, or one the job belongs to."""
    if key is None or key.admin:
        return
    if not await gateway.owned_by(job_id, key.name):
        raise unknown
