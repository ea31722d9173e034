"""The simulator's HTTP side: a keep-alive, chunked-streaming stdlib server.

Handlers answer with the bodies, status codes and error texts of Ollama's
server/routes.go, so client code meets the same shapes it will meet in prod;
``_openai`` adds the OpenAI-compatible routes on the same server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from avocado_sim import _catalog as catalog
from avocado_sim import _embed, _openai
from avocado_sim._state import Outcome, RecordedRequest, SimState
from avocado_sim._text import Reply, count_words, plan_chat

__all__ = ["SimServer", "host_is_loopback"]

ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
_JSON = "application/json; charset=utf-8"
_NDJSON = "application/x-ndjson"
_TEXT = "text/plain; charset=utf-8"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_KINDS = {
    str: "string",
    bool: "bool",
    int: "number",
    float: "number",
    list: "array",
    dict: "object",
}

# field -> (accepted Python types, Go type named in the error), per request struct
_Fields = dict[str, tuple[tuple[type, ...], str]]
_COMMON: _Fields = {
    "model": ((str,), "string"),
    "stream": ((bool,), "bool"),
    "options": ((dict,), "map[string]interface {}"),
    "keep_alive": ((str, int, float), "api.Duration"),
    "format": ((str, dict), "json.RawMessage"),
}
_GENERATE: _Fields = {
    **_COMMON,
    "prompt": ((str,), "string"),
    "suffix": ((str,), "string"),
    "system": ((str,), "string"),
    "template": ((str,), "string"),
    "raw": ((bool,), "bool"),
    "images": ((list,), "[]api.ImageData"),
    "context": ((list,), "[]int"),
}
_CHAT: _Fields = {
    **_COMMON,
    "messages": ((list,), "[]api.Message"),
    "tools": ((list,), "api.Tools"),
}


class _Abort(Exception):
    """The simulator is stopping or the client went away: drop the connection."""


def host_is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_allowed(header: str, allowed: list[str]) -> bool:
    """Ollama's allowedHostsMiddleware check of the Host header, port ignored."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if not host:
        return True
    for entry in allowed:
        name = entry.strip().lower().strip("[]")
        if name == "*" or name == host or (name.startswith(".") and host.endswith(name)):
            return True
    return False


def _json_error(raw: bytes, struct: str) -> tuple[Any, str | None]:
    """Parse a body the way gin's ShouldBindJSON reports problems."""
    if not raw.strip():
        return None, "missing request body"
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        pos = getattr(exc, "pos", 0) or 0
        text = raw.decode("utf-8", "replace")
        if pos >= len(text.rstrip()):
            return None, "unexpected EOF"
        return None, f"invalid character '{text[pos]}' looking for beginning of value"
    if not isinstance(body, dict):
        kind = _KINDS.get(type(body), "null")
        return body, f"json: cannot unmarshal {kind} into Go value of type api.{struct}"
    return body, None


def _type_error(body: dict[str, Any], fields: _Fields, struct: str) -> str | None:
    for name, (types, go_type) in fields.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kind = _KINDS.get(type(value), "value")
            return (
                f"json: cannot unmarshal {kind} into Go struct field "
                f"{struct}.{name} of type {go_type}"
            )
    return None


def _messages_error(messages: list[Any]) -> str | None:
    for message in messages:
        if not isinstance(message, dict):
            kind = _KINDS.get(type(message), "value")
            return (
                f"json: cannot unmarshal {kind} into Go struct field "
                "ChatRequest.messages of type api.Message"
            )
        for name in ("role", "content"):
            value = message.get(name)
            if value is not None and not isinstance(value, str):
                kind = _KINDS.get(type(value), "value")
                return (
                    f"json: cannot unmarshal {kind} into Go struct field "
                    f"Message.messages.{name} of type string"
                )
    return None


def _failure(status: int, model: str, what: str) -> tuple[bytes, str]:
    """An injected failure's body, shaped like its real-world source."""
    if status in (502, 504):  # a tunnel or reverse proxy answering for Ollama
        return f"{status} {_REASONS.get(status, 'Error')}".encode(), _TEXT
    message = {
        503: ERR_MAX_QUEUE,
        500: "llama runner process has terminated: exit status 2",
        400: f'"{model}" does not support {what}',
        404: f"model '{model}' not found",
        499: "request canceled",
    }.get(status, _REASONS.get(status, "error").lower())
    return _encode({"error": message}).encode(), _JSON


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: SimServer
    # Per request (set in _dispatch): a generation's call is counted by how it ended; an
    # answer in its slot waits while answers are held, and is not sent to a client gone.
    _is_generation = False
    _answer_pending = False
    _status = 0

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a log line per request would cost more than the answer."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_GET

    # -- plumbing ----------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _head(self, status: int, ctype: str | None, extra: str) -> bytes:
        if self._answer_pending:
            self._answer_pending = False
            if not self.server.state.await_release():
                raise _Abort
            if self._client_gone():
                raise ConnectionAbortedError("the client went away before its answer")
        self._status = status
        lines = f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nDate: {catalog.http_date()}\r\n"
        if ctype:
            lines += f"Content-Type: {ctype}\r\n"
        if self.close_connection:
            lines += "Connection: close\r\n"
        return (lines + extra + "\r\n").encode("latin-1")

    def _send(self, status: int, body: bytes, ctype: str | None = _JSON, extra: str = "") -> None:
        head = self._head(status, ctype, f"{extra}Content-Length: {len(body)}\r\n")
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, _encode(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _stream(self, lines: list[Any], *, first: bool) -> None:
        """Write NDJSON lines as one HTTP chunk each, sending the head with the first."""
        self._chunks([_encode(obj).encode() + b"\n" for obj in lines], first=first, ctype=_NDJSON)

    def _chunks(self, pieces: list[bytes], *, first: bool, ctype: str) -> None:
        """Write each piece as one HTTP chunk (raw on HTTP/1.0), the head with the first."""
        chunked = self.request_version == "HTTP/1.1"
        out: list[bytes] = []
        if first:
            if not chunked:
                self.close_connection = True
            te = "Transfer-Encoding: chunked\r\n" if chunked else ""
            out.append(self._head(200, ctype, te))
        for data in pieces:
            out.append(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        if out:
            self.wfile.write(b"".join(out))

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a worker killed, a job cancelled): its socket
        reads as ended. A write alone would not say so: the kernel takes a small answer."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _drop(self) -> None:
        """Cut the connection mid-answer, as a crashed server or a dead tunnel does."""
        raise _Abort

    def _retry_after(self, status: int) -> str:
        """The ``Retry-After`` header of an injected 429 or 503, when one is configured."""
        wait = self.server.state.config.retry_after_s
        return f"Retry-After: {wait:g}\r\n" if wait is not None and status in (429, 503) else ""

    def _in_slot(self, run: Callable[[], None], fail: Callable[[int], None]) -> None:
        """An injected failure, else a generation slot (503 when the queue is full), then run."""
        state = self.server.state
        status = state.take_failure()
        if status is not None:
            return fail(status)
        if not state.gate.enter(state.config, state.stopping):
            if state.stopping.is_set():
                raise _Abort
            return fail(503)
        self._answer_pending = True
        try:
            run()
        finally:
            self._answer_pending = False
            state.gate.leave()

    def _end_stream(self) -> None:
        if self.request_version == "HTTP/1.1":
            self.wfile.write(b"0\r\n\r\n")

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self.server.state.stopping.wait(seconds):
            raise _Abort

    def _dispatch(self) -> None:
        state = self.server.state
        started = time.perf_counter_ns()
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._error(400, "invalid request body framing")
            return
        try:
            recorded = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            recorded = None
        record = RecordedRequest(self.command, path, recorded, dict(self.headers.items()))
        if state.config.max_recorded > 0:
            state.requests.append(record)
        self._is_generation, self._status = False, 0
        outcome = Outcome.CUT
        try:
            if self.server.check_hosts and not _host_allowed(
                self.headers.get("Host", ""), state.config.allowed_hosts
            ):
                self._send(403, b"", None)
                return
            routes = _ROUTES.get(path)
            if routes is None:
                self._send(404, b"404 page not found", _TEXT)
            elif self.command not in routes:
                self._send(405, b"405 method not allowed", _TEXT)
            else:
                routes[self.command](self, raw, started)
            outcome = Outcome.ANSWERED if self._status < 400 else Outcome.REFUSED
        except _Abort:
            self.close_connection = True
        except OSError:  # the client closed the connection while its answer was written
            self.close_connection = True
            state.count_abandoned()
        except Exception as exc:  # a simulator bug: say so instead of hanging the client
            traceback.print_exc()
            self.close_connection = True
            self._error(500, f"ollama simulator error: {exc!r}")
            outcome = Outcome.REFUSED
        if self._is_generation:
            record.outcome = outcome
            state.count_outcome(outcome)

    def _generation_call(self) -> None:
        """This request is a generation: counted now, and by how it ends."""
        self._is_generation = True
        self.server.state.count_generation()

    # -- simple endpoints --------------------------------------------------

    def _root(self, raw: bytes, started: int) -> None:
        self._send(200, b"Ollama is running", _TEXT)

    def _version(self, raw: bytes, started: int) -> None:
        self._json(200, {"version": self.server.state.config.version})

    def _tags(self, raw: bytes, started: int) -> None:
        models = [
            catalog.tags_entry(catalog.card_for(name), catalog.local_iso(modified))
            for name, modified in self.server.state.pulled()
        ]
        self._json(200, {"models": models})

    def _ps(self, raw: bytes, started: int) -> None:
        models = [
            catalog.ps_entry(catalog.card_for(name), catalog.local_iso(expires), ctx)
            for name, expires, ctx in self.server.state.running_models()
        ]
        self._json(200, {"models": models})

    def _stats(self, raw: bytes, started: int) -> None:
        """The simulator's own counters (not Ollama's API): for a test or a benchmark that
        runs it as a subprocess."""
        state = self.server.state
        counts = {"generation_calls": state.generation_calls, "loads": state.loads}
        outcomes = {outcome.value: state.outcomes[outcome] for outcome in Outcome}
        self._json(200, {**counts, "abandoned": state.abandoned, "outcomes": outcomes})

    def _show(self, raw: bytes, started: int) -> None:
        body, err = _json_error(raw, "ShowRequest")
        if err is not None:
            return self._error(400, err)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            return self._error(400, "model is required")
        if not catalog.is_valid_name(name):
            return self._error(400, "invalid model name")
        state = self.server.state
        if not state.has_model(name):
            return self._error(404, f"model '{name}' not found")
        norm = catalog.normalize(name)
        modified = dict(state.pulled()).get(norm, state.started_at)
        show = catalog.show_body(
            catalog.card_for(norm), state.config.context_length, catalog.local_iso(modified)
        )
        self._json(200, show)

    def _delete(self, raw: bytes, started: int) -> None:
        body, err = _json_error(raw, "DeleteRequest")
        if err is not None:
            return self._error(400, err)
        name = body.get("model") or body.get("name")
        if not catalog.is_valid_name(name):
            return self._error(400, f'name "{name or ""}" is invalid')
        if not self.server.state.remove_model(name):
            return self._error(404, f"model '{name}' not found")
        self._send(200, b"", None)

    def _pull(self, raw: bytes, started: int) -> None:
        body, err = _json_error(raw, "PullRequest")
        if err is not None:
            return self._error(400, err)
        name = body.get("model") or body.get("name")
        if not catalog.is_valid_name(name):
            return self._error(400, "invalid model name")
        state, norm = self.server.state, catalog.normalize(name)
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        error = None if state.in_hub(norm) else "pull model manifest: file does not exist"
        if error is None:
            steps = max(state.config.pull_chunks, 0)
            for digest, size in catalog.card_for(norm).layers:
                lines += [
                    {
                        "status": f"pulling {digest[:12]}",
                        "digest": f"sha256:{digest}",
                        "total": size,
                        "completed": size * k // steps,
                    }
                    for k in range(1, steps + 1)
                ]
            lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
        if body.get("stream") is False:
            if error is not None:  # waitForStream: an error without a status is a 500
                return self._error(500, error)
            state.add_model(norm)
            return self._json(200, {"status": "success"})
        self._stream(lines, first=True)
        if error is None:
            state.add_model(norm)
        self._stream([{"error": error} if error else {"status": "success"}], first=False)
        self._end_stream()

    # -- generation --------------------------------------------------------

    def _generate(self, raw: bytes, started: int) -> None:
        self._generation(raw, started, chat=False)

    def _chat(self, raw: bytes, started: int) -> None:
        self._generation(raw, started, chat=True)

    def _generation(self, raw: bytes, started: int, *, chat: bool) -> None:
        state = self.server.state
        self._generation_call()
        struct = "ChatRequest" if chat else "GenerateRequest"
        body, err = _json_error(raw, struct)
        if err is None:
            err = _type_error(body, _CHAT if chat else _GENERATE, struct)
        if err is not None:
            return self._error(400, err)
        model = body.get("model") or ""
        if not model.strip():
            # ChatHandler says "model is required"; GenerateHandler's name check
            # falls back to a 404 that names the empty model.
            if chat:
                return self._error(400, "model is required")
            return self._error(404, "model '' not found")
        if not catalog.is_valid_name(model):
            return self._error(400, "invalid model name")
        if not state.has_model(model):
            return self._error(404, f"model '{model}' not found")
        if catalog.is_embedding(model):
            return self._error(400, f'"{model}" does not support {"chat" if chat else "generate"}')
        fmt = body.get("format")
        if isinstance(fmt, str) and fmt not in ("", "json"):
            return self._error(400, 'invalid format: expected "json" or a valid JSON schema')
        if not chat:
            if body.get("raw") and (
                body.get("template") or body.get("system") or body.get("context")
            ):
                return self._error(400, "raw mode does not support template, system, or context")
            if body.get("suffix"):
                full = "registry.ollama.ai/library/" + catalog.normalize(model)
                return self._error(400, f"{full} does not support insert")
        if body.get("think") not in (None, False, ""):
            return self._error(400, f'"{model}" does not support thinking')
        if chat and (err := _messages_error(body.get("messages") or [])) is not None:
            return self._error(400, err)

        def fail(status: int) -> None:
            payload, ctype = _failure(status, model, "chat" if chat else "generate")
            self._send(status, payload, ctype, self._retry_after(status))

        self._in_slot(lambda: self._run(body, started, chat=chat), fail)

    def _run(self, body: dict[str, Any], started: int, *, chat: bool) -> None:
        state, config = self.server.state, self.server.state.config
        model: str = body["model"]
        options = body.get("options") or {}
        num_ctx = options.get("num_ctx")
        num_ctx = num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else config.context_length
        keep_alive = catalog.keep_alive_seconds(body.get("keep_alive"))
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        empty = not messages if chat else not body.get("prompt")
        if empty and body.get("keep_alive") is not None and keep_alive == 0:
            state.unload(model)
            return self._json(200, self._load_reply(model, chat, "unload"))
        if state.load(model, num_ctx):
            self._pause(config.load_ms / 1000)
        state.mark_loaded(model, max(keep_alive, 60.0), num_ctx)
        loaded_at = time.perf_counter_ns()
        if empty:
            state.mark_loaded(model, keep_alive, num_ctx)
            return self._json(200, self._load_reply(model, chat, "load"))

        reply, prompt_tokens = self._plan(body, messages, options, chat=chat)
        prompt_tokens = min(prompt_tokens, num_ctx)
        stream = body.get("stream") is not False
        rate = config.tokens_per_s
        self._pause(state.latency_s())
        evaluated = time.perf_counter_ns()

        if stream:
            chunks = [self._chunk(model, tok, chat) for tok in reply.tokens]
            if reply.tool_calls:
                chunks.append(self._chunk(model, "", chat, reply.tool_calls))
            if state.take_drop():
                self._stream(chunks[:1], first=True)
                self._drop()
            if rate is None or not chunks:
                self._stream(chunks, first=True)
            else:
                self._stream([], first=True)
                for i, chunk in enumerate(chunks):
                    self._pause(evaluated / 1e9 + (i + 1) / rate - time.perf_counter_ns() / 1e9)
                    self._stream([chunk], first=False)
        elif rate is not None:
            self._pause(len(reply.tokens) / rate)
        finished = time.perf_counter_ns()
        final = self._chunk(model, "" if stream else "".join(reply.tokens), chat)
        if reply.tool_calls and not stream:
            final["message"]["tool_calls"] = reply.tool_calls
        final.update(
            done=True,
            done_reason=reply.done_reason,
            total_duration=max(finished - started, 1),
            load_duration=max(loaded_at - started, 1),
            prompt_eval_count=prompt_tokens,
            prompt_eval_duration=max(evaluated - loaded_at, 1),
            eval_count=reply.eval_count,
            eval_duration=max(finished - evaluated, 1),
        )
        if not chat and not body.get("raw"):
            seed = len(model)
            final["context"] = [
                (seed + i * 7919) % 128256 for i in range(prompt_tokens + reply.eval_count)
            ]
        state.mark_loaded(model, keep_alive, num_ctx)
        if stream:
            self._stream([final], first=False)
            self._end_stream()
        else:
            self._json(200, final)

    def _plan(
        self,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        options: dict[str, Any],
        *,
        chat: bool,
    ) -> tuple[Reply, int]:
        config = self.server.state.config
        tools = body.get("tools") if chat else None
        tool = None
        if tools and messages and messages[-1].get("role") == "user":
            tool = tools[0] if isinstance(tools[0], dict) else None
        if chat:
            texts = [m.get("content") for m in messages]
            pairs = [(m.get("role"), m.get("content")) for m in messages]
            images = sum(len(m.get("images") or []) for m in messages)
        else:
            images = len(body.get("images") or [])
            texts = [body.get("system"), body.get("prompt")]
            pairs = [("system", body["system"])] if body.get("system") else []
            pairs.append(("user", body.get("prompt")))
        stop = options.get("stop")
        # Ollama continues a trailing assistant message (ollama/ollama#6778).
        reply = plan_chat(
            body["model"],
            pairs,
            seed=options.get("seed"),
            continue_last=chat,
            fmt=body.get("format"),
            num_predict=options.get("num_predict"),
            default_tokens=config.default_tokens,
            stop=[stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None,
            tool=tool,
            images=images,
        )
        return reply, max(count_words(*texts), 1)

    @staticmethod
    def _chunk(
        model: str, text: str, chat: bool, tool_calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": model, "created_at": catalog.utc_timestamp()}
        if chat:
            chunk["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                chunk["message"]["tool_calls"] = tool_calls
        else:
            chunk["response"] = text
        chunk["done"] = False
        return chunk

    @staticmethod
    def _load_reply(model: str, chat: bool, reason: str) -> dict[str, Any]:
        reply = _Handler._chunk(model, "", chat)
        reply.update(done=True, done_reason=reason)
        return reply


_Route = Callable[[_Handler, bytes, int], None]
_ROUTES: dict[str, dict[str, _Route]] = {
    "/": {"GET": _Handler._root, "HEAD": _Handler._root},
    "/api/version": {"GET": _Handler._version, "HEAD": _Handler._version},
    "/api/tags": {"GET": _Handler._tags, "HEAD": _Handler._tags},
    "/api/ps": {"GET": _Handler._ps},
    "/api/show": {"POST": _Handler._show},
    "/api/pull": {"POST": _Handler._pull},
    "/api/delete": {"DELETE": _Handler._delete},
    "/api/generate": {"POST": _Handler._generate},
    "/api/chat": {"POST": _Handler._chat},
    "/_sim/stats": {"GET": _Handler._stats},
    **_openai.ROUTES,
    **_embed.ROUTES,
}


class SimServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connections so stop() can cut them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, host: str, port: int, state: SimState) -> None:
        self.state = state
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Like Ollama, only a loopback bind checks the Host header (DNS rebinding guard).
        self.check_hosts = host_is_loopback(host)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((host.strip("[]"), port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Dropped connections are expected (stop(), impatient clients); stay quiet."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
