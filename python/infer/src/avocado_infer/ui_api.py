"""The web page at ``/ui``: chat with the fleet's models and watch its nodes. The page is
plain HTML, CSS and JavaScript shipped in this package (``ui/``): no build step, nothing
fetched from elsewhere, so it works offline. Loading it needs no key; every piece of data it
shows comes from routes that ask for one (``Authorization: Bearer``), this router's
``GET /ui/api/fleet`` among them."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from avocado_infer.deps import CallerDep, GatewayDep, caller
from avocado_infer.errors import PlainError, documented_errors, error_route, plain_error

__all__ = ["router"]

router = APIRouter(prefix="/ui", route_class=error_route(plain_error))

_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page and its scripts come from this gateway only, and no other site may frame it.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def _asset(name: str, media_type: str) -> Response:
    content = (files("avocado_infer") / "ui" / name).read_bytes()
    return Response(content, media_type=media_type, headers=_HEADERS)


@router.get("", include_in_schema=False)
async def page() -> Response:
    """The page (it asks for an API key before it shows anything)."""
    return _asset("index.html", "text/html; charset=utf-8")


@router.get("/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """The page's script and style sheet; 404 for any other name."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        return plain_error(404, f"no such file of the page: {name!r}", True, None)
    return _asset(name, media_type)


@router.get(
    "/api/fleet",
    dependencies=[Depends(caller)],
    responses=documented_errors(PlainError),
)
async def fleet(gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """The fleet as the page's fleet view shows it: nodes, models and their backlog per lane,
    recent answers' speed; recent failures and dead letters to admin keys (they name every
    key's jobs) or when the gateway asks for no keys. A part that cannot be read says why."""
    admin = key is None or key.admin
    return await run_in_threadpool(gateway.fleet_view.read, admin)
