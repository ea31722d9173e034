"""Where the fleet's time goes: CPU per job of every process, py-spy of the worker, pyinstrument
of the producer, per-job wire counts and syscalls, and each piece timed alone."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from kombu.connection import Connection
from kombu.entity import Exchange

from avocado_shared import GenerateRequest, GenerateResult, Producer, ResultStore
from avocado_shared.contracts import validate_request
from avocado_shared.store import JobStatus
from bench.fleet_app import sqlite_full
from bench.report import median, percentile
from bench.scenarios import Config, alternate, burst, done, fleet, timed_ms, with_bare
from bench.services import RABBIT_HOST, REDIS_URL, BenchEnv, process_tree
from bench.streamed import streamed
from tests.processes import VENV_BIN, WorkerProcess, rabbitmqctl, spawn, stop_group

__all__ = ["cpu_ms", "profile", "servers"]

REDIS_PORT = urlsplit(REDIS_URL).port or 6379
RABBIT_PORT = int(RABBIT_HOST.rsplit(":", 1)[1])
_AMQP = ("(amqp/", "kombu/message.py", "kombu/transport/", "kombu/serialization.py")
# A sample goes to the first category one of whose patterns is in its stack.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("(logging/", "celery/app/log.py", "celery/utils/log.py")),
    ("task events: confirmed publishes to celeryev", ("EventDispatcher",)),
    ("ml_results row (SQLite)", ("ResultStore.",)),
    ("singleton lock (Redis EVAL)", ("_on_lock",)),
    ("result backend: read before write (Redis GET)", ("_get_task_meta_for",)),
    ("result backend: write (Redis SET + PUBLISH)", ("store_result", "mark_as_")),
    ("Ollama call (httpx, streamed)", ("OllamaClient.",)),
    ("Prometheus metrics (multiprocess files)", ("prometheus_client", "ollama_worker/metrics.py")),
    ("job contracts (pydantic)", ("pydantic", "validate_request")),
    # Library frames only: every main-process stack holds kombu's hub loop and every
    # child's holds billiard's pool loop, so those alone say nothing.
    ("AMQP: receive, decode, ack", _AMQP),
    ("pool IPC (billiard pipes)", ("billiard/connection.py", "billiard/queues.py", "asynpool.py")),
    ("Celery task tracing and dispatch, rest", ("celery/app/trace.py", "celery/worker/")),
]
# A threads-pool thread blocked on its work queue between jobs: py-spy's --nonblocking sampling
# can count that wait as active; it is left out.
_POOL_THREAD_WAIT = re.compile(r"^_worker \(.*concurrent/futures/thread\.py:\d+\)$")


def servers() -> dict[str, list[psutil.Process]]:
    """The processes listening on the RabbitMQ and Redis ports, by their CPU tables' names."""
    pids: dict[int, set[int]] = collections.defaultdict(set)
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid and c.laddr:
            pids[c.laddr.port].add(c.pid)
    ports = {"RabbitMQ (whole server)": RABBIT_PORT, "Redis (whole server)": REDIS_PORT}
    return {name: [psutil.Process(pid) for pid in pids[port]] for name, port in ports.items()}


def cpu_ms(groups: dict[str, list[psutil.Process]], run: Callable[[], object]) -> dict[str, float]:
    """CPU milliseconds (user + system) each group of processes used while ``run`` ran."""

    def seconds() -> dict[tuple[str, psutil.Process], float]:
        found = {}
        for name, proc in ((name, p) for name, procs in groups.items() for p in procs):
            with contextlib.suppress(psutil.Error):
                found[name, proc] = sum(proc.cpu_times()[:2])
        return found

    before, used = seconds(), dict.fromkeys(groups, 0.0)
    run()
    for (name, proc), t in seconds().items():
        used[name] += 1000.0 * (t - before.get((name, proc), t))
    return used


def _cpu_table(env: BenchEnv, cfg: Config, started: Any) -> dict[str, dict[str, float]]:
    """CPU ms per job of each group of processes, fleet and bare Celery (``started``)."""
    sim, worker, bare_worker, noop = started
    mine, columns, running = fleet(env.producer), {}, servers()
    sequential = lambda submit, jobs: timed_ms(done(submit), jobs)  # noqa: E731
    kinds = (("sequential", cfg.cpu_seq, sequential), ("bursts", cfg.cpu_burst, burst))
    for kind, jobs, how in kinds:
        for label, made, submit in (("fleet", worker, mine), ("bare Celery", bare_worker, noop)):
            groups = {"worker (main + pool)": process_tree(made)}
            groups |= {"harness: producer and result wait": [psutil.Process()], **running}
            groups |= {"simulator": [psutil.Process(sim.pid)]} if label == "fleet" else {}
            used = cpu_ms(groups, partial(how, submit, jobs))
            columns[f"{label}, {kind}"] = {name: ms / jobs for name, ms in used.items()}
    env.stop(bare_worker)
    return columns


def _spy(worker: WorkerProcess, seconds: float, env: BenchEnv, step: Callable[[], int]) -> Any:
    """py-spy record (CPU samples, all processes of the worker) while ``step`` runs jobs."""
    out = env.tmp / f"spy-{uuid.uuid4().hex[:6]}.txt"
    args = [shutil.which("py-spy") or str(VENV_BIN / "py-spy"), "record", "--pid", str(worker.pid)]
    args += ["--subprocesses", "--rate", "200", "--duration", str(max(1, round(seconds)))]
    args += ["--format", "raw", "--nonblocking", "--output", str(out)]
    spy, jobs = spawn(args, out.with_suffix(".log")), 0
    time.sleep(0.5)  # py-spy attaches
    while spy.poll() is None:  # it stops after --duration
        jobs += step()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {out.with_suffix('.log').read_text()[-300:]}"}
    categories, where, idle = collections.Counter[str](), collections.Counter[str](), 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        if _POOL_THREAD_WAIT.match(frames[-1]):
            idle += n
            continue
        forks = sum(f.startswith("process ") for f in frames)
        where["pool child" if forks > 1 else "main process"] += n
        body = [f for f in frames if not f.startswith(("process ", "thread "))]
        found = (name for name, pats in CATEGORIES if any(p in f for f in body for p in pats))
        categories[next(found, "other")] += n
    total = sum(where.values())
    shares = [(name, 100.0 * n / total) for name, n in categories.most_common()]
    processes = {k: 100.0 * v / total for k, v in where.items()}
    return {"jobs": jobs, "samples": total, "idle": idle, "processes": processes, "shares": shares}


# name -> (function, class or "", file fragment): wall time inside, per job.
_PRODUCER_PARTS = {
    "generate": ("generate", "Producer", "avocado_shared/producer.py"),
    "validate": ("validate_request", "", "contracts.py"),
    "subscribe": ("on_task_call", "", "backends/redis.py"),
    "publish": ("publish", "Producer", "kombu/messaging.py"),
    "event": ("publish", "EventDispatcher", "events/dispatcher.py"),
    "get": ("get", "JobHandle", "avocado_shared/producer.py"),
    "parse": ("parse_result", "", "contracts.py"),
}


def _producer_profile(producer: Producer, jobs: int) -> dict[str, Any]:
    from pyinstrument import Profiler

    start = time.perf_counter()
    with Profiler(interval=0.001) as profiler:
        timed_ms(done(fleet(producer)), jobs)
    wall = time.perf_counter() - start
    totals: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def walk(frame: Any, path: frozenset[tuple[str, str, str]]) -> None:
        key = (frame.function or "", frame.class_name or "", frame.file_path or "")
        if key not in path:
            totals[key] += frame.time
        for child in frame.children:
            walk(child, path | {key})

    if profiler.last_session is not None:
        walk(profiler.last_session.root_frame(), frozenset())

    def inside(function: str, cls: str, part: str) -> float:
        """ms per job in that function (of that class, any when ``cls`` is empty) and file."""
        keys = [k for k in totals if k[0] == function and k[1] == (cls or k[1]) and part in k[2]]
        return 1000.0 * sum(totals[k] for k in keys) / jobs

    ms = {name: inside(*where) for name, where in _PRODUCER_PARTS.items()}
    # The task-sent event is published through the same kombu producer, inside the job's publish.
    event = "`task-sent` event (only with AVOCADO_TASK_EVENTS): publish and wait for its confirm"
    rest = ms["generate"] - ms["publish"] - ms["subscribe"] - ms["validate"]
    parts = [
        ("request validation (pydantic)", ms["validate"]),
        ("job message: publish and wait for the broker's confirm", ms["publish"] - ms["event"]),
        (event, ms["event"]),
        ("SUBSCRIBE to the job's result channel (Redis backend)", ms["subscribe"]),
        ("rest of `Producer.generate` (Celery message, routing)", rest),
        ("waiting for the result (`JobHandle.get`)", ms["get"] - ms["parse"]),
        ("result parsing (pydantic)", ms["parse"]),
    ]
    return {"jobs": jobs, "wall_ms_per_job": 1000.0 * wall / jobs, "parts": parts}


_Groups = Callable[[], dict[str, list[psutil.Process]]]


def _job_sides(worker: WorkerProcess) -> _Groups:
    """The worker's processes and the harness (the producer), found anew at each call."""
    return lambda: {"worker": process_tree(worker), "producer": [psutil.Process()]}


def _sides(groups: _Groups, remote: int) -> dict[int, str]:
    """Local port -> the side (``groups``' name) of each TCP connection to port ``remote``."""
    found = {}
    for side, procs in groups().items():
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == remote and conn.laddr:
                        found[conn.laddr.port] = side
    return found


@contextlib.contextmanager
def _redis_traffic(groups: _Groups) -> Iterator[list[tuple[str, str, str]]]:
    """(side, command, first key) of every Redis command in the block, filled in at its end."""
    seen, found = list[tuple[int, str, str]](), list[tuple[str, str, str]]()
    stop, sides = threading.Event(), _sides(groups, REDIS_PORT)
    sock = socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=5)
    sock.sendall(b"MONITOR\r\n")
    sock.settimeout(0.2)
    pattern = re.compile(rb'\[\d+ [\d.]+:(\d+)\] "([^"]+)"(?: "([^"]*)")?')

    def read() -> None:
        buffer = b""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                if not (chunk := sock.recv(65536)):
                    return
                *lines, buffer = (buffer + chunk).split(b"\r\n")
                for match in filter(None, map(pattern.search, lines)):
                    port, command, key = match.groups(b"")
                    seen.append((int(port), command.decode().upper(), key.decode(errors="replace")))

    reader = threading.Thread(target=read, name="redis-monitor", daemon=True)
    reader.start()
    try:
        time.sleep(0.3)
        yield found
        time.sleep(0.5)
    finally:
        stop.set()
        reader.join(timeout=5)
        sock.close()
    sides |= _sides(groups, REDIS_PORT)  # the lock store connects on first use
    found += [(sides[p], c, k) for p, c, k in seen if p in sides and c != "MONITOR"]


def _rabbit_counts(vhost: str) -> dict[int, tuple[int, int]]:
    """Local port -> (socket reads, socket writes) at the broker, per connection of ``vhost``."""
    out = rabbitmqctl("list_connections", "vhost", "peer_port", "recv_cnt", "send_cnt")
    rows = [line.split("\t") for line in out.splitlines()]
    return {int(r[1]): (int(r[2]), int(r[3])) for r in rows if len(r) == 4 and r[0] == vhost}


_STRACE_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)[( ](\d+)?")


def _syscalls(text: str, worker: WorkerProcess, peers: dict[int, str]) -> Any:
    """Counts of the worker's traced calls: connects by peer, writes by where they went."""
    owners, fds = {}, {}  # strace -f names each thread (the threads pool's too) by its id
    for proc in process_tree(worker):
        with contextlib.suppress(psutil.Error):
            owners.update({thread.id: proc.pid for thread in proc.threads()})
            for conn in proc.net_connections("tcp"):
                if conn.raddr and conn.fd >= 0:
                    fds[(proc.pid, conn.fd)] = conn.raddr.port
    calls, connects = collections.Counter[str](), collections.Counter[str]()
    for line in text.splitlines():
        match = _STRACE_LINE.match(line)
        if not match or ("resumed>" in line and "<..." not in line):
            continue
        pid, call, fd = owners.get(int(match[1]), int(match[1])), match[2], int(match[3] or -1)
        if call == "connect":
            port = re.search(r"htons\((\d+)\)", line)
            connects[peers.get(int(port[1]), "other") if port else "unix"] += 1
        elif call in ("fsync", "fdatasync"):
            calls["fsync/fdatasync (SQLite commit)"] += 1
        elif call == "pwrite64":
            calls["pwrite64 (SQLite pages and WAL)"] += 1
        elif (peer := fds.get((pid, fd))) is not None:
            calls[f"socket sends to {peers.get(peer, str(peer))}"] += 1
        else:
            calls["writes to pipes and files (pool IPC, log)"] += 1
    return calls, connects


def _wire(env: BenchEnv, worker: WorkerProcess, sim_port: int, jobs: int) -> dict[str, Any]:
    """Per-job counts: connections, Redis commands, AMQP socket ops, syscalls to each peer."""
    trace, tracer = env.tmp / "strace.txt", None
    if exe := shutil.which("strace"):
        args = [exe, "-f", "-qq", "-o", str(trace), "-e"]
        args += ["trace=connect,sendto,sendmsg,write,pwrite64,fsync,fdatasync"]
        args += [a for p in process_tree(worker) for a in ("-p", str(p.pid))]
        tracer = spawn(args, env.tmp / "strace.log")
        time.sleep(1.0)  # attached
    groups = _job_sides(worker)
    counted = _traffic(env, groups, lambda: timed_ms(done(fleet(env.producer)), jobs), jobs)
    if tracer is not None:
        stop_group(tracer, signal.SIGINT, timeout=15)
    peers = {5672: "RabbitMQ", REDIS_PORT: "Redis", sim_port: "Ollama"}
    text = trace.read_text(errors="replace") if trace.exists() else ""
    calls, connects = _syscalls(text, worker, peers)
    found: dict[str, Any] = {"jobs": jobs, **counted}
    found |= {"strace": tracer is not None, "connects": {k: v / jobs for k, v in connects.items()}}
    found["syscalls"] = {k: v / jobs for k, v in sorted(calls.items())}
    return found


def _traffic(
    env: BenchEnv, groups: _Groups, run: Callable[[], object], jobs: int
) -> dict[str, Any]:
    """Per job of ``run``, by side: Redis commands (MONITOR), AMQP socket reads and writes (the
    broker's counters of this run's vhost) and the AMQP connections opened."""
    before = _rabbit_counts(env.vhost)
    with _redis_traffic(groups) as commands:
        run()
    after = _rabbit_counts(env.vhost)
    redis: collections.Counter[str] = collections.Counter()
    for side, command, key in commands:
        kind = " lock" if ":lock:" in key else " result"
        redis[f"{side}: {command}{kind * (command in ('GET', 'SET', 'SETEX', 'MGET', 'DEL'))}"] += 1
    amqp: dict[str, list[int]] = {}
    for port, side in _sides(groups, 5672).items():
        was, now = before.get(port, (0, 0)), after.get(port, (0, 0))
        counts = amqp.setdefault(side, [0, 0])
        counts[0], counts[1] = counts[0] + now[0] - was[0], counts[1] + now[1] - was[1]
    return {
        "new_amqp": len(set(after) - set(before)) / jobs,
        "amqp": {side: (r / jobs, s / jobs) for side, (r, s) in amqp.items()},
        "redis": {k: v / jobs for k, v in sorted(redis.items())},
    }


def _gateway_wire(env: BenchEnv, pool: str, requests: int) -> dict[str, Any]:
    """Per streamed ``/api/generate`` through the gateway, one at a time (an instant simulator,
    24 tokens): the gateway's and the worker's Redis commands and AMQP socket operations."""
    sim = env.start_sim()
    worker = env.start_worker(pool=pool, concurrency=4, ollama_url=sim.url)
    gateway, secret = env.start_gateway()
    auth = {"Authorization": f"Bearer {secret}"}
    client = env.closing(httpx.Client(timeout=60, headers=auth))
    texts: dict[int, str] = {}
    ask = partial(streamed, client, gateway.url, texts=texts)
    ask(0)  # warm: connections, the model's queue, the worker's threads

    def groups() -> dict[str, list[psutil.Process]]:
        return {"gateway": [psutil.Process(gateway.pid)], "worker": process_tree(worker)}

    found = _traffic(env, groups, lambda: [ask(i) for i in range(requests)], requests)
    env.stop(gateway, worker, sim)
    return {"requests": requests, **found}


def _locks(env: BenchEnv, cfg: Config, worker: WorkerProcess) -> dict[str, Any]:
    """Redis commands of a keyed job (a singleton lock), and p50 with and without a key."""
    run = uuid.uuid4().hex[:6]

    def keyed(prefix: str | None) -> Callable[[int], Any]:
        key: Callable[[int], str | None] = lambda i: prefix and f"{prefix}-{i}"  # noqa: E731
        return done(lambda i: env.producer.generate(f"lock {i}", idempotency_key=key(i)))

    with _redis_traffic(_job_sides(worker)) as commands:
        timed_ms(keyed(f"bench-{run}"), cfg.lock_jobs)
    lock = [(side, c) for side, c, key in commands if ":lock:" in key or c in ("EVAL", "EVALSHA")]
    counts = collections.Counter(f"{side}: {command} lock" for side, command in lock)
    p50: dict[str, list[float]] = {"plain": [], "keyed": []}

    def latency(name: str, rep: int) -> None:
        call = keyed(f"lat-{run}-{rep}" if name == "keyed" else None)
        p50[name].append(percentile(timed_ms(call, cfg.lock_latency_jobs), 50))

    alternate(cfg.reps, partial(latency, "plain"), partial(latency, "keyed"))
    return {
        "lock_commands": {k: v / cfg.lock_jobs for k, v in sorted(counts.items())},
        "lock_latency": {name: median(values) for name, values in p50.items()},
    }


def _micro(env: BenchEnv, count: int) -> list[tuple[str, float, str]]:
    """What the pieces cost alone, in-process: median ms per call (after three warm ones)."""

    def timed(call: Callable[[int], Any], times: int = count) -> float:
        timed_ms(call, 3)
        return median(timed_ms(call, times))

    def upsert(pragma: str) -> tuple[str, float, str]:
        undo = sqlite_full() if pragma == "FULL" else lambda: None
        store = ResultStore.open(f"sqlite:///{env.tmp / f'micro-{pragma}.sqlite3'}")
        store.migrate()
        row: dict[str, Any] = dict(task_type="generate", share_id=None, status=JobStatus.STARTED)
        ms = timed(lambda i: store.record(job_key=f"g:{i}", job_id=f"{i}", worker="w", **row))
        store.close()
        undo()
        what = f"`ml_results` upsert, SQLite WAL, synchronous={pragma}"
        return what, ms, "two rows per job: STARTED and SUCCESS"

    def publish(confirm: bool) -> tuple[str, float, str]:
        exchange = Exchange("bench.micro", type="topic", durable=False, auto_delete=True)
        body = {"type": "task-succeeded", "uuid": str(uuid.uuid4()), "result": "x" * 600}
        with Connection(env.broker_url, transport_options={"confirm_publish": confirm}) as conn:
            publisher = conn.Producer(exchange=exchange, serializer="json")
            exchange(conn.default_channel).declare()
            ms = timed(lambda _: publisher.publish(body, routing_key="e", delivery_mode=1))
            exchange(conn.default_channel).delete()
        what = f"event-sized publish to RabbitMQ, {'with' if confirm else 'without'} confirm"
        how = "a task event, with AVOCADO_TASK_EVENTS on: 4 per job (sent, received, started, "
        return what, ms, how + "succeeded); none by default"

    found = [upsert("FULL"), upsert("NORMAL"), publish(True), publish(False)]
    backend, ids = env.producer.app.backend, [str(uuid.uuid4()) for _ in range(count + 3)]
    payload = {"text": "x" * 200, "model": "m", "worker": "w"}
    ms = timed(lambda i: backend.store_result(ids[i], payload, "SUCCESS"))
    what = "Celery Redis backend `store_result` (GET, then SET + PUBLISH)"
    found.append((what, ms, "once per job: SUCCESS (twice with `task_track_started`)"))
    client = env.closing(env.redis())
    ms = timed(lambda i: client.get(f"{env.key_prefix}x{i}"))
    found.append(("Redis GET round trip", ms, "the read Celery makes before each result write"))
    request = {"prompt": "hello", "model": "llama3.2:1b", "options": {}}
    result = {"job_id": "x", "text": "y" * 200, "model": "m", "worker": "w"}

    def contracts(_: int) -> None:
        validate_request(GenerateRequest, request)
        GenerateResult(**result).model_dump(mode="json")

    ms = timed(contracts, count * 5)
    what = "pydantic: request validated + result built and dumped"
    found.append((what, ms, "producer and worker validate once each"))
    env.purge_results()
    return found


def profile(env: BenchEnv, cfg: Config, pool: str) -> dict[str, Any]:
    """CPU, py-spy, the producer, wire counts, the singleton lock and micro costs, one pool."""
    started = with_bare(env, cfg, pool)
    sim, worker = started[:2]
    cfg.log("  CPU per job")
    found: dict[str, Any] = {"cpu": _cpu_table(env, cfg, started)}
    mine, size = fleet(env.producer), min(cfg.dispatch_jobs, 200)
    cfg.log("  py-spy")
    found["spy_sequential"] = _spy(worker, cfg.profile_s, env, lambda: len(timed_ms(done(mine), 1)))
    found["spy_burst"] = _spy(worker, cfg.profile_s, env, lambda: (burst(mine, size), size)[1])
    cfg.log("  pyinstrument, wire counts, singleton lock")
    found["producer"] = _producer_profile(env.producer, cfg.producer_jobs)
    found["wire"] = _wire(env, worker, urlsplit(sim.url).port or 0, cfg.wire_jobs)
    found.update(_locks(env, cfg, worker))
    env.stop(worker, sim)
    found["gateway_wire"] = _gateway_wire(env, pool, cfg.wire_jobs)
    cfg.log("  micro costs")
    found["micro"] = _micro(env, cfg.micro_calls)
    return found
