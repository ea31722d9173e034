"""The fleet's own job routes, beside the Ollama and OpenAI APIs: ``DELETE /jobs/{id}``
cancels a job (``avocado_shared.cancel``), so the GPU under it stops."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error
from avocado_infer.gateway import Gateway, gateway

__all__ = ["router"]

router = APIRouter(
    prefix="/jobs", route_class=error_route(plain_error), responses=documented_errors(PlainError)
)
Fleet = Annotated[Gateway, Depends(gateway)]


@router.delete("/{job_id}", status_code=202)
async def cancel(job_id: str, fleet: Fleet) -> dict[str, str]:
    """Cancel ``job_id``: queued, it never runs; generating, it stops at its next chunk and
    its inference stream is closed. Accepted, not done: ``ml_results`` says CANCELLED once
    its worker sees the flag (a job id no worker ever takes just leaves a flag that expires)."""
    await run_in_threadpool(fleet.producer.cancel, job_id)
    return {"id": job_id, "status": "cancelling"}
