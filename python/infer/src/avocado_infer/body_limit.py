"""The largest request body the gateway reads: one past it is refused (413) in the shape of the
API its path is under, before it is held in memory whole (images make bodies large). A route
may have a limit of its own: file uploads are written to disk as they arrive, and a batch's
file is far larger than any one request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avocado_infer.errors import Render

__all__ = ["BodyLimit", "Limit"]


@dataclass(frozen=True)
class Limit:
    """At most ``size`` bytes in the bodies of the paths under ``prefix`` ("" for every path),
    set by the setting ``setting`` (named in the 413's message)."""

    prefix: str
    size: int
    setting: str
    advice: str

    def message(self) -> str:
        return (
            f"the request body is over the gateway's limit of {self.size} bytes "
            f"({self.setting}): {self.advice}"
        )


class BodyLimit:
    """ASGI middleware: a declared ``Content-Length`` over ``limit`` is answered at once; a
    body sent in chunks is counted as it is read, and its route answers the 413 (FastAPI
    passes an ``HTTPException`` raised while reading the body on to the route's error
    handling, which renders it in its API's shape)."""

    def __init__(self, app: ASGIApp, limits: list[Limit], render: Callable[[str], Render]) -> None:
        """``limits``: the first whose prefix a path starts with applies (the last one's
        prefix should be ""); ``render``: the error shape of the API a path is under."""
        self.app = app
        self.limits = limits
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next(one for one in self.limits if scope["path"].startswith(one.prefix))
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit.size:
            response = self.render(scope["path"])(413, limit.message(), True, None)
            await response(scope, receive, send)
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit.size:
                    raise HTTPException(413, limit.message())
            return message

        await self.app(scope, counted, send)
