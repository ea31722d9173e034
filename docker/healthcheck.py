#!/usr/bin/env python3
"""Health of one part of the fleet, for Docker's HEALTHCHECK and the start script's waits.

    avocado-healthcheck worker [NODE]   the worker NODE (default worker@<hostname>) answers a ping
    avocado-healthcheck beat            the broker beat publishes to accepts a connection
    avocado-healthcheck flower [URL]    Flower's dashboard (default http://127.0.0.1:5555/)
                                        answers 200 to the credentials in FLOWER_BASIC_AUTH
    avocado-healthcheck infer [URL]     avocado-infer's /readyz (default
                                        http://127.0.0.1:11435/readyz) answers 200: it
                                        reaches the broker and Redis

Exit 0 when healthy, 1 with one line saying why when not. Never prints a credential.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

TIMEOUT_S = 10.0


def _worker(node: str | None) -> str | None:
    from ollama_worker import app

    name = node or f"worker@{socket.gethostname()}"
    replies = app.control.ping(destination=[name], timeout=TIMEOUT_S / 2)
    return None if replies else f"worker {name} did not answer a ping"


def _beat() -> str | None:
    from ollama_worker import app

    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=TIMEOUT_S / 2)
    except Exception as error:  # any failure to connect means unhealthy
        return f"broker unreachable: {type(error).__name__}"
    return None


def _flower(url: str | None) -> str | None:
    target = url or "http://127.0.0.1:5555/"
    if not target.startswith(("http://", "https://")):
        return f"not an http(s) URL: {target}"
    credentials = os.environ.get("FLOWER_BASIC_AUTH", "").split(",")[0]
    if ":" not in credentials:
        return "FLOWER_BASIC_AUTH is not set to user:password"
    token = base64.b64encode(credentials.encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    request = urllib.request.Request(target, headers=headers)  # noqa: S310 (checked above)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as error:
        if error.code == 401:
            return f"Flower at {target} refused the credentials in FLOWER_BASIC_AUTH (401)"
        return f"Flower at {target} answered {error.code}"
    except OSError as error:
        return f"Flower at {target} does not answer: {error}"
    return None if status == 200 else f"Flower at {target} answered {status}"


def _infer(url: str | None) -> str | None:
    target = url or "http://127.0.0.1:11435/readyz"
    if not target.startswith(("http://", "https://")):
        return f"not an http(s) URL: {target}"
    try:
        with urllib.request.urlopen(target, timeout=TIMEOUT_S) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as error:
        # /readyz names what it cannot reach (broker, redis) in its 503's body.
        said = error.read(300).decode(errors="replace").strip()
        return f"avocado-infer at {target} answered {error.code}: {said}"
    except OSError as error:
        return f"avocado-infer at {target} does not answer: {error}"
    return None if status == 200 else f"avocado-infer at {target} answered {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    part, rest = (args[0], args[1:]) if args else ("worker", [])
    checks: dict[str, Callable[[], str | None]] = {
        "worker": lambda: _worker(rest[0] if rest else None),
        "beat": _beat,
        "flower": lambda: _flower(rest[0] if rest else None),
        "infer": lambda: _infer(rest[0] if rest else None),
    }
    if part not in checks or len(rest) > 1 or (part == "beat" and rest):
        print(__doc__, file=sys.stderr)
        return 2
    problem = checks[part]()
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
