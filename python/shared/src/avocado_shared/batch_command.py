"""``avocado batch submit|status|list|cancel|results``: OpenAI's batches of the HTTP gateway from
a shell. It talks to the gateway (``AVOCADO_GATEWAY_URL``, with the key ``AVOCADO_API_KEY``
from the environment, never the command line), since the gateway keeps the batches' files and
moves them on; the standard library's HTTP client, so the shared package stays light. A file
is uploaded and a result downloaded a block at a time, never held whole."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

from avocado_shared.contracts import InvalidRequest
from avocado_shared.errors import NotFound, PermanentError, TransientError, Unavailable
from avocado_shared.settings import Settings

__all__ = ["BatchEnded", "add_batch_parser", "run_batch"]

_BLOCK = 1 << 16
_FINAL = ("completed", "failed", "expired", "cancelled")


class BatchEnded(PermanentError):
    """A batch waited for ended otherwise than completed (failed, expired, cancelled)."""

    exit_code: ClassVar[int] = 3


def add_batch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``avocado batch ...`` to the ``avocado`` command."""
    batch = sub.add_parser(
        "batch", help="OpenAI batches of the HTTP gateway (AVOCADO_GATEWAY_URL, AVOCADO_API_KEY)"
    )
    actions = batch.add_subparsers(dest="batch_command", required=True)
    submit = actions.add_parser("submit", help="upload a JSONL file and start its batch")
    submit.add_argument("file", type=Path, help="one request a line, in OpenAI's batch format")
    submit.add_argument(
        "--endpoint", help="the lines' endpoint (default: the url of the file's first line)"
    )
    submit.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    submit.add_argument(
        "--wait", action="store_true", help="wait for its end, with a progress bar on stderr"
    )
    submit.add_argument("--poll-s", type=float, default=1.0, help="how often to look (--wait)")
    for name, what in (("status", "a batch's state (JSON)"), ("cancel", "cancel a batch")):
        actions.add_parser(name, help=what).add_argument("batch_id")
    listing = actions.add_parser("list", help="the key's batches, newest first")
    listing.add_argument("--limit", type=int, default=20)
    results = actions.add_parser(
        "results", help="a batch's output file on stdout (--errors: its error file)"
    )
    results.add_argument("batch_id")
    results.add_argument("--errors", action="store_true")


class _Gateway:
    """The gateway's /v1 routes over HTTP; its errors as the fleet's."""

    def __init__(self, settings: Settings) -> None:
        self.base = settings.gateway_url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise InvalidRequest(f"AVOCADO_GATEWAY_URL: an http(s) URL, not {self.base!r}")
        self.headers = {}
        if settings.api_key is not None:
            self.headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"

    def _open(
        self,
        method: str,
        path: str,
        data: bytes | Iterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> IO[bytes]:
        # S310: the URL is http(s), checked when the client is made.
        request = urllib.request.Request(  # noqa: S310
            f"{self.base}{path}",
            data=data,
            method=method,
            headers={**self.headers, **(headers or {})},
        )
        try:
            response: IO[bytes] = urllib.request.urlopen(request, timeout=60)  # noqa: S310
        except urllib.error.HTTPError as error:
            raise _refused(error) from None
        except urllib.error.URLError as error:
            raise Unavailable(
                f"the gateway at {self.base} cannot be reached: {error.reason}"
            ) from None
        return response

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else None
        with self._open(method, path, data, headers) as response:
            return json.load(response)

    def upload(self, file: Path) -> Any:
        """Upload ``file`` (purpose batch) as a multipart body sent a block at a time."""
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{file.name}"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            with file.open("rb") as handle:
                while block := handle.read(_BLOCK):
                    yield block
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + file.stat().st_size + len(tail)),
        }
        with self._open("POST", "/v1/files", body(), headers) as response:
            return json.load(response)

    def download(self, file_id: str, out: IO[bytes]) -> None:
        with self._open("GET", f"/v1/files/{file_id}/content") as response:
            while block := response.read(_BLOCK):
                out.write(block)


def _refused(error: urllib.error.HTTPError) -> Exception:
    """The gateway's error answer as the fleet's error of its kind."""
    try:
        message = json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {error.code}"
    if error.code == 404:
        return NotFound(message)
    if error.code in (400, 413, 422):
        return InvalidRequest(message)
    if error.code == 429 or error.code >= 500:
        return TransientError(message)
    return PermanentError(message)


def _endpoint(file: Path) -> str:
    """The url of the file's first request (the file is not read further)."""
    with file.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                url = json.loads(raw).get("url")
                if isinstance(url, str):
                    return url
                break
    raise InvalidRequest(f"{file}: its first line has no url: give --endpoint")


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    if not all("=" in pair for pair in pairs):
        raise InvalidRequest("--metadata: give KEY=VALUE")
    return dict(pair.split("=", 1) for pair in pairs)


def _bar(batch: Mapping[str, Any], width: int = 30) -> str:
    counts = batch.get("request_counts") or {}
    total, failed = counts.get("total", 0), counts.get("failed", 0)
    done = counts.get("completed", 0) + failed
    filled = width * done // total if total else 0
    bar = "#" * filled + "." * (width - filled)
    return f"{batch['id']} {batch['status']:<11} [{bar}] {done}/{total} ({failed} failed)"


def _waited(gateway: _Gateway, batch: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Poll the batch until it ends, its progress on stderr (one line, redrawn on a
    terminal; a line a change elsewhere)."""
    live = sys.stderr.isatty()
    shown = ""
    while True:
        line = _bar(batch)
        if line != shown:
            print(f"\r{line}" if live else line, end="" if live else "\n", file=sys.stderr)
            shown = line
        if batch["status"] in _FINAL:
            if live:
                print(file=sys.stderr)
            return batch
        time.sleep(poll_s)
        batch = gateway.json("GET", f"/v1/batches/{batch['id']}")


def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``avocado batch ...``: ids and files on stdout, progress and notes on stderr."""
    gateway = _Gateway(settings)
    command = args.batch_command
    if command == "submit":
        endpoint = args.endpoint or _endpoint(args.file)
        uploaded = gateway.upload(args.file)
        body = {
            "input_file_id": uploaded["id"],
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": _metadata(args.metadata),
        }
        batch = gateway.json("POST", "/v1/batches", body)
        print(batch["id"])
        if args.wait:
            batch = _waited(gateway, batch, args.poll_s)
            if batch["status"] != "completed":
                errors = (batch.get("errors") or {}).get("data") or []
                said = "; ".join(f"line {e.get('line')}: {e.get('message')}" for e in errors)
                raise BatchEnded(
                    f"batch {batch['id']} {batch['status']}" + (f": {said}" if said else "")
                )
    elif command == "status":
        print(json.dumps(gateway.json("GET", f"/v1/batches/{args.batch_id}"), indent=2))
    elif command == "cancel":
        print(_bar(gateway.json("POST", f"/v1/batches/{args.batch_id}/cancel")))
    elif command == "list":
        for batch in gateway.json("GET", f"/v1/batches?limit={args.limit}")["data"]:
            print(f"{_bar(batch)}  {batch['endpoint']}")
    else:
        batch = gateway.json("GET", f"/v1/batches/{args.batch_id}")
        file_id = batch["error_file_id" if args.errors else "output_file_id"]
        if file_id is None:
            which = "error" if args.errors else "output"
            print(f"batch {batch['id']} ({batch['status']}) has no {which} file", file=sys.stderr)
            return 0
        gateway.download(file_id, sys.stdout.buffer)
    return 0
