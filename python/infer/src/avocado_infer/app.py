"""The gateway's FastAPI app, made by ``create_app``: importing it connects to nothing; the
producer and the Redis client are made when the app starts and closed when it stops. Every
route of the APIs asks for an API key (``access``); the health routes do not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from avocado_infer import (
    batches_api,
    embed_api,
    files_api,
    jobs_api,
    ollama_api,
    openai_api,
    responses_api,
    ui_api,
)
from avocado_infer.batch_runner import BatchRunner
from avocado_infer.body_limit import BodyLimit, Limit
from avocado_infer.deps import GatewayDep, caller
from avocado_infer.errors import Render, plain_error
from avocado_infer.files_api import file_store
from avocado_infer.gateway import Gateway
from avocado_infer.metrics import instrument
from avocado_infer.openai_api import openai_error
from avocado_infer.settings import InferSettings
from avocado_shared.tracing import flush_tracing, tracing_active

__all__ = ["create_app"]


def _render_for(path: str) -> Render:
    """The error shape of the API ``path`` is under: OpenAI's for /v1, else Ollama's."""
    return openai_error if path.startswith("/v1/") else plain_error


def _traced(app: FastAPI) -> None:
    """Each request its server span (OpenTelemetry's FastAPI instrumentation), the parent of
    the jobs it publishes; not one span per chunk a stream sends."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"]
    )


def create_app(settings: InferSettings | None = None) -> FastAPI:
    """The app on ``settings`` (from the environment when None)."""
    chosen = settings or InferSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway(chosen, metrics)
        metrics.watch(app.state.gateway.served_models)
        gateway = app.state.gateway
        tasks = [
            asyncio.create_task(gateway.limiter.renewing()),
            asyncio.create_task(BatchRunner(gateway, file_store(gateway)).running()),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.gateway.close()
            flush_tracing()

    app = FastAPI(title="avocado-infer", lifespan=lifespan)
    size = chosen.max_body_bytes or chosen.fleet.max_request_bytes
    limits = [
        Limit("/v1/files", chosen.max_file_bytes, "AVOCADO_INFER_MAX_FILE_BYTES", "split the file"),
        Limit("", size, "AVOCADO_INFER_MAX_BODY_BYTES", "send smaller or fewer images"),
    ]
    app.add_middleware(BodyLimit, limits=limits, render=_render_for)
    metrics = instrument(app)
    if tracing_active():
        _traced(app)
    keyed = [Depends(caller)]
    app.include_router(ollama_api.router, dependencies=keyed)
    app.include_router(openai_api.router, dependencies=keyed)
    app.include_router(responses_api.router, dependencies=keyed)
    app.include_router(embed_api.ollama_router, dependencies=keyed)
    app.include_router(embed_api.openai_router, dependencies=keyed)
    app.include_router(files_api.router, dependencies=keyed)
    app.include_router(batches_api.router, dependencies=keyed)
    app.include_router(jobs_api.router, dependencies=keyed)
    app.include_router(ui_api.router)  # the page loads keyless; its data routes ask for one

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.exception_handler(HTTPException)
    async def unrouted(request: Request, error: HTTPException) -> Response:
        """No such route (404) or method (405), in the shape of the API the path is under."""
        response = _render_for(request.url.path)(error.status_code, str(error.detail), True, None)
        response.headers.update(error.headers or {})
        return response

    @app.get("/readyz")
    async def readyz(gateway: GatewayDep) -> JSONResponse:
        """The broker and Redis answer: jobs can be published and their streams read."""
        problems = await gateway.unready()
        if problems:
            return JSONResponse({"status": "unavailable", **problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app
