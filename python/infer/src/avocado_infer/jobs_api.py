"""The fleet's own job routes, beside the Ollama and OpenAI APIs: a job's state
(``job_state``), the summary job over HTTP with its singleton semantics, and ``DELETE
/jobs/{id}``, which cancels a job (``avocado_shared.cancel``) so the GPU under it stops. A key
reads and cancels only its own jobs, unless it is an admin key (``ownership``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from avocado_infer.deps import CallerDep, GatewayDep
from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error
from avocado_infer.job_state import unknown_job, unknown_summary
from avocado_infer.ledger import Noted
from avocado_infer.ownership import check_owner
from avocado_shared.contracts import JobKind, SummarizeRequest

__all__ = ["router"]

router = APIRouter(
    prefix="/jobs", route_class=error_route(plain_error), responses=documented_errors(PlainError)
)


@router.post("/summarize", status_code=202)
async def summarize(body: SummarizeRequest, gateway: GatewayDep, key: CallerDep) -> JSONResponse:
    """Queue a summary of ``share_id``; while one of that share is queued or running, that
    job is the answer, not a second one (and it belongs to this key too). Its state, as ``GET
    /jobs/{id}`` tells it."""
    handle = await gateway.summarize(body, owner=None if key is None else key.name)
    noted = Noted(JobKind.SUMMARIZE, body.share_id)
    view = await gateway.job(handle.id, noted)
    return JSONResponse(view.to_json(), status_code=202, headers={"Location": f"/jobs/{handle.id}"})


@router.get("/summarize/{share_id}")
async def summary(share_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """The newest summary job of ``share_id``: its state, and its result once it succeeded;
    404 when it is not this key's."""
    view, result = await gateway.summary(share_id)
    await check_owner(gateway, key, view.id, unknown_summary(share_id))
    return view.to_json() | {"result": result}


@router.get("/{job_id}")
async def job(job_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """The job's state, its worker and attempts; while queued, its queue and how many jobs
    at most wait ahead of it (a quorum queue cannot be peeked: see ``job_state``). 404 when
    it is not this key's."""
    await check_owner(gateway, key, job_id, unknown_job(job_id))
    view = await gateway.job(job_id)
    return view.to_json()


@router.delete("/{job_id}", status_code=202)
async def cancel(job_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, str]:
    """Cancel ``job_id``: queued, it never runs; generating, it stops at its next chunk and
    its inference stream is closed. Accepted, not done: ``ml_results`` says CANCELLED once
    its worker sees the flag (a job id no worker ever takes just leaves a flag that expires).
    404, and nothing cancelled, when it is not this key's."""
    await check_owner(gateway, key, job_id, unknown_job(job_id))
    await gateway.cancel(job_id)
    return {"id": job_id, "status": "cancelling"}
