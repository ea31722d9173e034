"""The dependencies every API's routes share: ``GatewayDep``, the app's ``Gateway``; ``caller``,
which asks for an API key (``Authorization: Bearer``) on every route of the APIs; and
``ADMITTED``, which lets a generation in while its key is within its limits, and holds the
key's slot until the response has ended. Logs name a key, never its
secret."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from avocado_infer.errors import OverLimit, Unauthorized
from avocado_infer.gateway import Gateway
from avocado_shared.errors import Unavailable
from avocado_shared.keys import ApiKey

__all__ = ["ADMITTED", "CallerDep", "GatewayDep", "app_gateway", "caller"]

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key made by `avocado keys create` (unless AVOCADO_INFER_REQUIRE_KEYS "
    "is false).",
)


def app_gateway(request: Request) -> Gateway:
    """The app's gateway (made in its lifespan); tests override this dependency."""
    found: Gateway = request.app.state.gateway
    return found


GatewayDep = Annotated[Gateway, Depends(app_gateway)]


async def caller(
    request: Request,
    gateway: GatewayDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey | None:
    """The request's API key, also kept as ``request.state.api_key`` for what follows from it
    (its default lane); None when the gateway asks for none. ``Unauthorized`` without a key,
    or with one that is unknown or revoked."""
    if not gateway.settings.require_keys:
        return None
    if credentials is None:
        logger.info("%s %s refused: no API key", request.method, request.url.path)
        raise Unauthorized("no API key: send one as 'Authorization: Bearer <key>'")
    try:
        key = await gateway.key(credentials.credentials)
    except redis.RedisError as error:
        raise Unavailable(
            f"API keys cannot be checked, Redis does not answer: {error}",
            retry_after=gateway.settings.busy_retry_after_s,
        ) from None
    if key is None:
        logger.info(
            "%s %s refused: an unknown or revoked API key", request.method, request.url.path
        )
        raise Unauthorized("the API key is unknown or revoked")
    request.state.api_key = key
    return key


CallerDep = Annotated[ApiKey | None, Depends(caller)]
"""The request's API key in a route (asked once a request, however many ask for it)."""


async def admitted(request: Request, gateway: GatewayDep, key: CallerDep) -> AsyncIterator[None]:
    """Let a generation in: ``OverLimit`` when its key is over a limit (its model and its
    lane's backlog are checked where it is published: ``Gateway.generate``); the key's slot is
    held until the response has been sent (FastAPI ends this dependency then), whether it
    streamed, failed or its client left."""
    if key is None or not (key.rpm or key.concurrency):  # nothing to count: no thread hop
        yield
        return
    try:
        slot = await gateway.admit(key)
    except OverLimit as error:
        logger.info("%s %s refused: %s", request.method, request.url.path, error)
        raise
    except redis.RedisError as error:
        raise Unavailable(
            f"the key's limits cannot be counted, Redis does not answer: {error}",
            retry_after=gateway.settings.busy_retry_after_s,
        ) from None
    try:
        yield
    finally:
        if slot is not None:
            with anyio.CancelScope(shield=True):  # released even if the request is cancelled
                await gateway.release(slot)


ADMITTED = [Depends(admitted)]  # a generation: its key's limits
