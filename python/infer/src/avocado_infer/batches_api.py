"""OpenAI's Batch API: ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches``
(newest first, ``after`` and ``limit``) and ``POST /v1/batches/{id}/cancel``, in OpenAI's
shapes; the batches themselves are moved on by ``batch_runner``. A batch belongs to its key as
a file does; a key has at most ``AVOCADO_INFER_MAX_OPEN_BATCHES`` open."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from avocado_infer.batches import FINAL, Batch, BatchStore, Endpoint
from avocado_infer.deps import CallerDep, GatewayDep
from avocado_infer.errors import OverLimit, documented_errors, error_route
from avocado_infer.files_api import caller_of, file_store, listed
from avocado_infer.gateway import Gateway
from avocado_infer.openai_api import OpenAIError, openai_error
from avocado_shared.contracts import InvalidRequest

__all__ = ["router"]

router = APIRouter(
    prefix="/v1", route_class=error_route(openai_error), responses=documented_errors(OpenAIError)
)


def batch_store(gateway: Gateway) -> BatchStore:
    settings = gateway.settings
    return BatchStore(gateway.redis, settings.fleet.key_prefix, settings.batch_retention_s)


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def _shown(store: BatchStore, batch: Batch) -> dict[str, Any]:
    return batch.to_json(cancel_asked=store.cancel_asked(batch.id))


@router.post("/batches")
async def create(body: BatchBody, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """A batch of the requests of ``input_file_id`` (the key's file), ``validating`` until
    its file is checked; 429 when the key has its most open batches."""
    owner, admin = caller_of(key)
    stored = await run_in_threadpool(file_store(gateway).get, body.input_file_id, owner, admin)
    if stored.purpose != "batch":
        raise InvalidRequest(f"input_file_id: {stored.id} is not a file of purpose batch")
    store = batch_store(gateway)
    limit = gateway.settings.max_open_batches
    if owner is not None and limit and await run_in_threadpool(store.open_of, owner) >= limit:
        raise OverLimit(
            f"the key {owner} has {limit} batches open, its most "
            "(AVOCADO_INFER_MAX_OPEN_BATCHES): wait for one to end",
            retry_after=gateway.settings.busy_retry_after_s,
        )
    made = await run_in_threadpool(store.create, body.endpoint, stored.id, owner, body.metadata)
    return made.to_json()


@router.get("/batches/{batch_id}")
async def batch(batch_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """OpenAI's Batch object; 404 when the key has no such batch."""
    store = batch_store(gateway)
    found = await run_in_threadpool(store.get, batch_id, *caller_of(key))
    return await run_in_threadpool(_shown, store, found)


@router.get("/batches")
async def batches(
    gateway: GatewayDep,
    key: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """The key's batches, newest first, ``limit`` a page after the batch ``after``."""
    store = batch_store(gateway)

    def page() -> tuple[list[dict[str, Any]], bool]:
        shown: list[dict[str, Any]] = []
        skipping = after is not None
        for found in store.newest(*caller_of(key)):
            if skipping:
                skipping = found.id != after
                continue
            if len(shown) == limit:
                return shown, True
            shown.append(_shown(store, found))
        return shown, False

    data, more = await run_in_threadpool(page)
    return listed(data, has_more=more)


@router.post("/batches/{batch_id}/cancel")
async def cancel(batch_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """Cancel the batch: ``cancelling`` at once, then ``cancelled`` once its queued lines'
    jobs are cancelled, with every answer already made in its output file and the rest in its
    error file (``batch_cancelled``). A batch that has ended is left as it is."""
    store = batch_store(gateway)
    found = await run_in_threadpool(store.get, batch_id, *caller_of(key))
    if found.status not in FINAL:
        await run_in_threadpool(store.ask_cancel, batch_id)
    return await run_in_threadpool(_shown, store, found)
