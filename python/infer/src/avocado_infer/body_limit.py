"""The largest request body the gateway reads: one past it is refused (413) in the shape of the
API its path is under, before it is held in memory whole (images make bodies large)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avocado_infer.errors import Render

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: a declared ``Content-Length`` over ``limit`` is answered at once; a
    body sent in chunks is counted as it is read, and its route answers the 413 (FastAPI
    passes an ``HTTPException`` raised while reading the body on to the route's error
    handling, which renders it in its API's shape)."""

    def __init__(self, app: ASGIApp, limit: int, render: Callable[[str], Render]) -> None:
        """``render``: the error shape of the API a path is under."""
        self.app = app
        self.limit = limit
        self.render = render

    def _message(self) -> str:
        return (
            f"the request body is over the gateway's limit of {self.limit} bytes "
            "(AVOCADO_INFER_MAX_BODY_BYTES): send smaller or fewer images"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = self.render(scope["path"])(413, self._message(), True, None)
            await response(scope, receive, send)
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)
