"""The gateway's FastAPI app, made by ``create_app``: importing it connects to nothing; the
producer and the Redis client are made when the app starts and closed when it stops. Every
route of the APIs asks for an API key (``access``); the health routes do not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from avocado_infer import jobs_api, ollama_api, openai_api
from avocado_infer.access import caller
from avocado_infer.gateway import Gateway, gateway
from avocado_infer.metrics import instrument
from avocado_infer.settings import InferSettings

__all__ = ["create_app"]


def create_app(settings: InferSettings | None = None) -> FastAPI:
    """The app on ``settings`` (from the environment when None)."""
    chosen = settings or InferSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway(chosen, metrics)
        renewing = asyncio.create_task(app.state.gateway.limiter.renewing())
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await app.state.gateway.close()

    app = FastAPI(title="avocado-infer", lifespan=lifespan)
    metrics = instrument(app)
    keyed = [Depends(caller)]
    app.include_router(ollama_api.router, dependencies=keyed)
    app.include_router(openai_api.router, dependencies=keyed)
    app.include_router(jobs_api.router, dependencies=keyed)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(fleet: Annotated[Gateway, Depends(gateway)]) -> JSONResponse:
        """The broker and Redis answer: jobs can be published and their streams read."""
        problems = await fleet.unready()
        if problems:
            return JSONResponse({"status": "unavailable", **problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app
