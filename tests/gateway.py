"""The gateway (avocado-infer) inside the test process: uvicorn on a thread, serving the app
``create_app`` makes, as ``avocado-infer`` would, on a loopback socket bound beforehand."""

from __future__ import annotations

import socket
import threading

import uvicorn

from avocado_infer import InferSettings, create_app

__all__ = ["InProcessGateway"]


class InProcessGateway:
    """One gateway on a thread. Its socket listens before uvicorn starts, so a request made
    at once waits in the kernel's backlog until the app (its lifespan run) accepts it."""

    def __init__(self, settings: InferSettings) -> None:
        self.settings = settings
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self) -> InProcessGateway:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down as on SIGTERM: open responses end, the lifespan closes the clients."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()
        if self._thread.is_alive():
            raise AssertionError(f"gateway on {self.url} did not stop in {timeout}s")
