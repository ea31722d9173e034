"""Configuration and shared, thread-safe state of the Ollama simulator."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any, Literal, overload

from avocado_sim._catalog import normalize

__all__ = ["Outcome", "RecordedRequest", "RequestLog", "SimConfig", "SimState", "SlotGate"]

_LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "0.0.0.0"]  # noqa: S104 - a Host value
# Ollama also accepts these suffixes on a loopback bind (allowedHost in server/routes.go).
_LOCAL_SUFFIXES = [".localhost", ".local", ".internal"]
_GOLDEN = (5**0.5 - 1) / 2  # consecutive multiples mod 1 spread evenly over [0, 1)


@dataclass
class SimConfig:
    """How the simulated Ollama behaves; mutable while it runs."""

    models: list[str] = field(default_factory=lambda: ["llama3.2:1b"])
    """Models already pulled; /api/pull appends, /api/delete removes."""
    hub: list[str] | None = None
    """Models /api/pull can fetch; None accepts any well-formed name."""
    latency_ms: float = 0.0
    """Delay before the first token (streaming) or the answer."""
    latency_jitter_ms: float = 0.0
    """Generations' delays spread evenly over latency_ms +/- this, as real answers vary; a
    golden-ratio sequence, not random draws, so runs of the same length compare. 0: every
    generation waits the same."""
    tokens_per_s: float | None = None
    """None sends all tokens at once; a rate paces them."""
    fail_first: int = 0
    """Fail this many of the next generate/chat calls; counts down as they fail."""
    fail_status: int = 503
    retry_after_s: float | None = None
    """Sent as ``Retry-After`` with injected 429 and 503 failures; None sends none."""
    drop_first: int = 0
    """Cut the connection after the first token of this many of the next streamed
    generations (either API), as a crashed server does; counts down as they drop."""
    interrupt_first: int = 0
    """End this many of the next streamed OpenAI-compatible generations after their first
    token with a bare ``[DONE]`` and no ``finish_reason``, as llama-cpp-python's server does
    to a stream when another request comes in (its ``interrupt_requests``)."""
    parallel: int = 4
    """Generation slots, like OLLAMA_NUM_PARALLEL."""
    load_ms: float = 0.0
    """Time to load a model that is not in memory (Ollama's ``load_duration``): what a swap
    between models costs on a GPU."""
    max_loaded: int = 0
    """Models that fit in memory at once, like OLLAMA_MAX_LOADED_MODELS: loading one more
    evicts the least recently used. 0: any number."""
    max_queue: int = 512
    """Requests that may wait for a slot, like OLLAMA_MAX_QUEUE; beyond it: 503."""
    context_length: int = 4096
    """The model's context window, reported by /api/show and /api/ps, and on the OpenAI side
    (which refuses longer requests with a 400, as vLLM does) where openai_context_in says."""
    openai_context_in: Literal["models", "props"] | None = "models"
    """Where the OpenAI side reports the context: vLLM's ``max_model_len`` in /v1/models,
    llama.cpp's ``n_ctx`` in GET /props, or None: nowhere, as some servers do."""
    pull_chunks: int = 5
    """Progress lines per layer in a streamed /api/pull."""
    allowed_hosts: list[str] = field(default_factory=lambda: [*_LOOPBACK_NAMES, *_LOCAL_SUFFIXES])
    """Host header values accepted on a loopback bind (any port); '.x' is a suffix, '*' any."""
    default_tokens: int = 24
    """Reply length when the request sets no num_predict."""
    version: str = "0.12.6"
    """What /api/version reports."""
    max_recorded: int = 10_000
    """Recorded requests kept (oldest dropped); 0 records nothing, for benchmarks."""

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        counts = (self.max_queue, self.latency_ms, self.fail_first, self.drop_first)
        if min(*counts, self.interrupt_first) < 0:
            raise ValueError(
                "max_queue, latency_ms, fail_first, drop_first and interrupt_first cannot be "
                "negative"
            )
        if not 0 <= self.latency_jitter_ms <= self.latency_ms:
            raise ValueError("latency_jitter_ms must be between 0 and latency_ms")
        if self.tokens_per_s is not None and self.tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be positive or None")


class Outcome(str, Enum):
    """How a generation call ended: what a test counts to tell a model call made twice from
    one cut short."""

    ANSWERED = "answered"
    """The whole answer was sent."""
    REFUSED = "refused"
    """An error status was sent."""
    CUT = "cut"
    """The answer was not sent whole: the client went away before or while it was written
    (a worker killed, a job cancelled), or the simulator cut it (``drop_first``, ``stop``)."""


@dataclass
class RecordedRequest:
    """One request as the simulator received it."""

    method: str
    path: str
    body: Any
    """The parsed JSON body; None when there was none or it was not JSON."""
    headers: Mapping[str, str]
    outcome: Outcome | None = None
    """A generation's, once it ended; None for other requests and while it runs."""


class RequestLog(Sequence[RecordedRequest]):
    """Thread-safe record of received requests, readable like a list."""

    def __init__(self, maxlen: int) -> None:
        self._lock = threading.Lock()
        self._items: deque[RecordedRequest] = deque(maxlen=max(maxlen, 0))

    def append(self, item: RecordedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def snapshot(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def to(self, path: str) -> list[RecordedRequest]:
        """The requests sent to one path, oldest first."""
        return [r for r in self.snapshot() if r.path == path]

    def last(self, path: str | None = None) -> RecordedRequest:
        """The newest request (to ``path`` if given); LookupError if there is none."""
        for item in reversed(self.snapshot()):
            if path is None or item.path == path:
                return item
        raise LookupError(f"no request recorded for {path or 'any path'}")

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @overload
    def __getitem__(self, index: int) -> RecordedRequest: ...
    @overload
    def __getitem__(self, index: slice) -> list[RecordedRequest]: ...
    def __getitem__(self, index: int | slice) -> RecordedRequest | list[RecordedRequest]:
        return self.snapshot()[index]

    def __iter__(self) -> Iterator[RecordedRequest]:
        return iter(self.snapshot())

    def __repr__(self) -> str:
        return f"RequestLog({self.snapshot()!r})"


class SlotGate:
    """Ollama's scheduler in miniature: `parallel` slots and a bounded wait queue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0

    def enter(self, config: SimConfig, stopping: threading.Event) -> bool:
        """Take a slot, waiting if needed; False means 'server busy' (or shutting down)."""
        with self._cond:
            if self.running + self.waiting >= max(config.parallel, 1) + config.max_queue:
                return False
            self.waiting += 1
            self._cond.notify_all()
            try:
                while self.running >= max(config.parallel, 1) and not stopping.is_set():
                    self._cond.wait(0.1)  # re-read config.parallel if a test raises it
                if stopping.is_set():
                    return False
                self.running += 1
                return True
            finally:
                self.waiting -= 1
                self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self.running -= 1
            self._cond.notify_all()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, in_flight: int, timeout: float) -> bool:
        """Block until exactly `in_flight` generations are running or queued."""
        with self._cond:
            return self._cond.wait_for(lambda: self.running + self.waiting == in_flight, timeout)


@lru_cache(maxsize=64)
def _normalized(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(normalize(n) for n in names)


class SimState:
    """Everything the request handlers share, behind one lock."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.gate = SlotGate()
        self.stopping = threading.Event()
        self.requests = RequestLog(config.max_recorded)
        self.generation_calls = 0
        self.outcomes: Counter[Outcome] = Counter()  # generation calls that ended, by how
        self.abandoned = 0  # answers whose client closed the connection before their end
        self.released = threading.Event()  # cleared: answers wait before their first byte
        self.released.set()
        self.held = 0  # answers waiting for release
        self._latencies = 0  # generations so far, never reset: the jitter sequence goes on
        self.started_at = time.time()
        self.modified: dict[str, float] = {}
        self.loaded: dict[str, tuple[float, int]] = {}  # name -> (expires epoch, num_ctx)
        self.loads = 0  # models loaded into memory so far (each swap is one)

    def count_generation(self) -> None:
        with self.lock:
            self.generation_calls += 1

    def count_abandoned(self) -> None:
        with self.lock:
            self.abandoned += 1

    def count_outcome(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def await_release(self) -> bool:
        """Wait while answers are held; False when the simulator stops meanwhile."""
        if self.released.is_set():
            return True
        with self.lock:
            self.held += 1
        try:
            while not self.released.wait(0.05):
                if self.stopping.is_set():
                    return False
            return True
        finally:
            with self.lock:
                self.held -= 1

    def latency_s(self) -> float:
        """The next generation's delay: latency_ms, moved by its place in the jitter sequence."""
        with self.lock:
            n = self._latencies
            self._latencies += 1
        spread = ((n * _GOLDEN) % 1.0) * 2.0 - 1.0
        return (self.config.latency_ms + spread * self.config.latency_jitter_ms) / 1000.0

    def take_failure(self) -> int | None:
        """The status to fail this call with, consuming one of config.fail_first."""
        with self.lock:
            if self.config.fail_first <= 0:
                return None
            self.config.fail_first -= 1
            return self.config.fail_status

    def take_drop(self) -> bool:
        """True when this streamed generation must be cut, consuming one of drop_first."""
        return self._count_down("drop_first")

    def take_interrupt(self) -> bool:
        """True when this stream must end early, consuming one of interrupt_first."""
        return self._count_down("interrupt_first")

    def _count_down(self, name: str) -> bool:
        with self.lock:
            left = int(getattr(self.config, name))
            if left <= 0:
                return False
            setattr(self.config, name, left - 1)
            return True

    def has_model(self, name: str) -> bool:
        return normalize(name) in _normalized(tuple(self.config.models))

    def in_hub(self, name: str) -> bool:
        hub = self.config.hub
        return hub is None or normalize(name) in _normalized(tuple(hub))

    def add_model(self, name: str) -> None:
        norm = normalize(name)
        with self.lock:
            if norm not in _normalized(tuple(self.config.models)):
                self.config.models.append(norm)
            self.modified[norm] = time.time()

    def remove_model(self, name: str) -> bool:
        norm = normalize(name)
        with self.lock:
            kept = [m for m in self.config.models if normalize(m) != norm]
            if len(kept) == len(self.config.models):
                return False
            self.config.models[:] = kept
            self.loaded.pop(norm, None)
            return True

    def pulled(self) -> list[tuple[str, float]]:
        """(name, modified epoch) of every local model, newest first like Ollama."""
        with self.lock:
            names = sorted(_normalized(tuple(self.config.models)))
            found = [(n, self.modified.get(n, self.started_at)) for n in names]
        return sorted(found, key=lambda item: -item[1])

    def mark_loaded(self, name: str, keep_alive_s: float, num_ctx: int) -> bool:
        """Record a model as resident; True when it was not loaded before."""
        norm = normalize(name)
        now = time.time()
        with self.lock:
            before = self.loaded.get(norm)
            fresh = before is None or before[0] <= now
            if keep_alive_s <= 0:
                self.loaded.pop(norm, None)
            else:
                self.loaded[norm] = (now + keep_alive_s, num_ctx)
            return fresh

    def load(self, name: str, num_ctx: int) -> bool:
        """Make ``name`` resident, evicting the least recently used model when memory is full
        (``max_loaded``); True when it had to be loaded (the caller waits ``load_ms``)."""
        norm = normalize(name)
        now = time.time()
        with self.lock:
            for gone in [n for n, (exp, _) in self.loaded.items() if exp <= now]:
                self.loaded.pop(gone)
            entry = self.loaded.pop(norm, None)
            if entry is not None:  # used now: the most recently used
                self.loaded[norm] = entry
                return False
            limit = self.config.max_loaded
            while limit > 0 and len(self.loaded) >= limit:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[norm] = (now + 60.0, num_ctx)
            self.loads += 1
            return True

    def unload(self, name: str) -> None:
        with self.lock:
            self.loaded.pop(normalize(name), None)

    def running_models(self) -> list[tuple[str, float, int]]:
        """(name, expires epoch, num_ctx) of loaded models, longest-lived first."""
        now = time.time()
        with self.lock:
            for name in [n for n, (exp, _) in self.loaded.items() if exp <= now]:
                del self.loaded[name]
            found = [(n, exp, ctx) for n, (exp, ctx) in self.loaded.items()]
        return sorted(found, key=lambda item: -item[1])
