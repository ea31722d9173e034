"""Where the fleet's time goes, and what each applied fix saves.

``profile``: py-spy samples of the worker (main process and pool children) under sequential
and burst load, pyinstrument of the producer, and per-job wire counts (connections, Redis
commands, AMQP socket operations, fsyncs). ``fixes``: each fix applied in the package undone
through ``bench/fleet_app.py``, and each candidate not applied made there, measured end to
end against the current fleet in the same rotation.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from kombu.connection import Connection
from kombu.entity import Exchange
from tests.rabbit import machine_broker
from tests.services import VENV_BIN

from avocado_shared import GenerateRequest, GenerateResult, Producer, ResultStore
from avocado_shared.contracts import validate_request
from avocado_shared.store import JobStatus
from bench.fleet_app import CANDIDATES, CHANGES, UNDONE, environment
from bench.noop_app import NOOP_TASK
from bench.scenarios import Config, alternate, fleet_burst, warm_fleet
from bench.services import REDIS_URL, BenchEnv, Worker
from bench.stats import median, percentile

__all__ = ["fixes", "profile"]

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
    (
        "AMQP: receive, decode, ack",
        ("(amqp/", "kombu/message.py", "kombu/transport/", "kombu/serialization.py"),
    ),
    ("pool IPC (billiard pipes)", ("billiard/connection.py", "billiard/queues.py", "asynpool.py")),
    ("Celery task tracing and dispatch, rest", ("celery/app/trace.py", "celery/worker/")),
]
_OTHER = "other"
# A threads-pool thread blocked on its work queue between jobs: py-spy's --nonblocking sampling
# can count that wait as active; it is left out.
_POOL_THREAD_WAIT = re.compile(r"^_worker \(.*concurrent/futures/thread\.py:\d+\)$")


# --- py-spy ----------------------------------------------------------------------------------


def _spy(worker: Worker, seconds: float, tmp: Path, load: Callable[[threading.Event], int]) -> Any:
    """py-spy record (CPU samples, all processes of the worker) while ``load`` runs."""
    exe = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    out = tmp / f"spy-{uuid.uuid4().hex[:6]}.txt"
    rate = 200
    args = [exe, "record", "--pid", str(worker.pid), "--subprocesses", "--rate", str(rate)]
    args += ["--duration", str(max(1, round(seconds))), "--format", "raw", "--nonblocking"]
    args += ["--output", str(out)]
    spy = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop = threading.Event()
    done = [0]

    def run() -> None:
        done[0] = load(stop)

    time.sleep(0.5)  # py-spy attaches
    runner = threading.Thread(target=run)
    runner.start()
    try:
        _, err = spy.communicate(timeout=seconds + 60)
    finally:
        stop.set()
        runner.join()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
    return _categorize(out.read_text(), rate, done[0])


def _categorize(raw: str, rate: int, jobs: int) -> dict[str, Any]:
    by_category: collections.Counter[str] = collections.Counter()
    by_process: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if _POOL_THREAD_WAIT.match(frames[-1]):
            idle += count
            continue
        processes = [f for f in frames if f.startswith("process ")]
        by_process["pool child" if len(processes) > 1 else "main process"] += count
        total += count
        body = [f for f in frames if not f.startswith(("process ", "thread "))]
        name = next(
            (n for n, pats in CATEGORIES if any(p in f for f in body for p in pats)), _OTHER
        )
        by_category[name] += count
        seen = set()
        for frame in body:
            func = re.sub(r":\d+\)$", ")", frame)
            if func not in seen:
                seen.add(func)
                functions[func] += count
    per_job = (1000.0 / rate / jobs) if jobs else 0.0
    return {
        "jobs": jobs,
        "samples": total,
        "idle": idle,
        "rate": rate,
        "cpu_ms_per_job": total * per_job,
        "processes": {k: v * per_job for k, v in by_process.items()},
        "categories": [
            (name, n * per_job, 100.0 * n / total) for name, n in by_category.most_common()
        ]
        if total
        else [],
    }


def _sequential_load(producer: Producer) -> Callable[[threading.Event], int]:
    def load(stop: threading.Event) -> int:
        count = 0
        while not stop.is_set():
            producer.generate(f"profile {count}").get(timeout=60)
            count += 1
        return count

    return load


def _burst_load(producer: Producer, size: int) -> Callable[[threading.Event], int]:
    def load(stop: threading.Event) -> int:
        count = 0
        while not stop.is_set():
            fleet_burst(producer, size)
            count += size
        return count

    return load


# --- pyinstrument of the producer -------------------------------------------------------------

SENT_EVENT = "`task-sent` event (only with AVOCADO_TASK_EVENTS): publish and wait for its confirm"
JOB_PUBLISH = "job message: publish and wait for the broker's confirm"
RESULT_WAIT = "waiting for the result (`JobHandle.get`)"

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

    profiler = Profiler(interval=0.001)
    start = time.perf_counter()
    profiler.start()
    for i in range(jobs):
        producer.generate(f"pyinstrument {i}").get(timeout=60)
    profiler.stop()
    wall = time.perf_counter() - start
    root = profiler.last_session.root_frame() if profiler.last_session else None
    totals: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def walk(frame: Any, path: frozenset[tuple[str, str, str]]) -> None:
        key = (frame.function or "", frame.class_name or "", frame.file_path or "")
        if key not in path:
            totals[key] += frame.time
            path = path | {key}
        for child in frame.children:
            walk(child, path)

    if root is not None:
        walk(root, frozenset())
    ms: dict[str, float] = {}
    for name, (function, cls, fragment) in _PRODUCER_PARTS.items():
        seconds = sum(
            t
            for (f, c, path), t in totals.items()
            if f == function and (not cls or c == cls) and fragment in path
        )
        ms[name] = 1000.0 * seconds / jobs
    # The task-sent event is published through the same kombu producer, inside the job's publish.
    parts = [
        ("request validation (pydantic)", ms["validate"]),
        (JOB_PUBLISH, ms["publish"] - ms["event"]),
        (SENT_EVENT, ms["event"]),
        ("SUBSCRIBE to the job's result channel (Redis backend)", ms["subscribe"]),
        (
            "rest of `Producer.generate` (Celery message, routing)",
            ms["generate"] - ms["publish"] - ms["subscribe"] - ms["validate"],
        ),
        (RESULT_WAIT, ms["get"] - ms["parse"]),
        ("result parsing (pydantic)", ms["parse"]),
    ]
    return {"jobs": jobs, "wall_ms_per_job": 1000.0 * wall / jobs, "parts": parts}


# --- wire counts -----------------------------------------------------------------------------


def _ports(processes: list[psutil.Process], remote: int) -> dict[int, int]:
    """Local port -> pid of each TCP connection these processes hold to ``remote``."""
    found: dict[int, int] = {}
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == remote and conn.laddr:
                    found[conn.laddr.port] = proc.pid
    return found


def _thread_owners(processes: list[psutil.Process]) -> dict[int, int]:
    """Thread id -> pid: ``strace -f`` names each thread (the threads pool's too) by its id."""
    owners: dict[int, int] = {}
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            owners.update({thread.id: proc.pid for thread in proc.threads()})
    return owners


def _fds(processes: list[psutil.Process]) -> dict[tuple[int, int], int]:
    """(pid, fd) -> remote port of every TCP connection of these processes."""
    found: dict[tuple[int, int], int] = {}
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.fd >= 0:
                    found[(proc.pid, conn.fd)] = conn.raddr.port
    return found


@contextlib.contextmanager
def _redis_monitor() -> Iterator[list[tuple[int, str, str]]]:
    """Every Redis command while the block runs: (client port, command, first key)."""
    host, port = "127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    seen: list[tuple[int, str, str]] = []
    stop = threading.Event()
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(b"MONITOR\r\n")
    sock.settimeout(0.2)
    pattern = re.compile(rb'\[\d+ [\d.]+:(\d+)\] "([^"]+)"(?: "([^"]*)")?')

    def read() -> None:
        buffer = b""
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                match = pattern.search(line)
                if match:
                    key = (match.group(3) or b"").decode(errors="replace")
                    seen.append((int(match.group(1)), match.group(2).decode().upper(), key))

    reader = threading.Thread(target=read, name="redis-monitor", daemon=True)
    reader.start()
    try:
        time.sleep(0.3)
        yield seen
        time.sleep(0.5)
    finally:
        stop.set()
        reader.join(timeout=5)
        sock.close()


def _rabbit_counts(vhost: str) -> dict[int, tuple[int, int]]:
    """Local port -> (socket reads, socket writes) at the broker, per connection of ``vhost``."""
    out = machine_broker().ctl("list_connections", "vhost", "peer_port", "recv_cnt", "send_cnt")
    counts: dict[int, tuple[int, int]] = {}
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[0] == vhost and fields[1].isdigit():
            counts[int(fields[1])] = (int(fields[2]), int(fields[3]))
    return counts


_STRACE_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)[( ](\d+)?")


def _strace(pids: list[int], out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("strace")
    if exe is None:
        return None
    args = [
        exe,
        "-f",
        "-qq",
        "-o",
        str(out),
        "-e",
        "trace=connect,sendto,sendmsg,write,pwrite64,fsync,fdatasync",
    ]
    for pid in pids:
        args += ["-p", str(pid)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return proc


def _lock_commands(env: BenchEnv, worker: Worker, jobs: int) -> dict[str, float]:
    """Redis commands per job of a keyed generation (``idempotency_key``: a singleton lock)."""
    producer = env.producer
    procs = worker.processes()
    redis_port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    sides = {port: "worker" for port in _ports(procs, redis_port)}
    sides.update({port: "producer" for port in _ports([psutil.Process()], redis_port)})
    run = uuid.uuid4().hex[:6]
    with _redis_monitor() as commands:
        for i in range(jobs):
            producer.generate(f"keyed {i}", idempotency_key=f"bench-{run}-{i}").get(timeout=60)
    # Ports opened during the run (the lock store connects on first use) are named after.
    sides.update({port: "worker" for port in _ports(worker.processes(), redis_port)})
    sides.update({port: "producer" for port in _ports([psutil.Process()], redis_port)})
    counts: collections.Counter[str] = collections.Counter()
    for port, command, key in commands:
        side = sides.get(port)
        if side is not None and (":lock:" in key or command in ("EVAL", "EVALSHA")):
            counts[f"{side}: {command} lock"] += 1
    return {k: v / jobs for k, v in sorted(counts.items())}


def _lock_latency(producer: Producer, reps: int, jobs: int) -> dict[str, float]:
    """p50 of sequential jobs with and without an idempotency key, alternating."""
    keyed: list[float] = []
    plain: list[float] = []
    run = uuid.uuid4().hex[:6]

    def measure(into: list[float], keyed_jobs: bool) -> Callable[[int], None]:
        def go(rep: int) -> None:
            times = []
            for i in range(jobs):
                key = f"lat-{run}-{rep}-{i}" if keyed_jobs else None
                start = time.perf_counter()
                producer.generate(f"lock {i}", idempotency_key=key).get(timeout=60)
                times.append(1000.0 * (time.perf_counter() - start))
            into.append(percentile(times, 50))

        return go

    alternate(reps, measure(plain, False), measure(keyed, True))
    return {"plain": median(plain), "keyed": median(keyed)}


def _wire(env: BenchEnv, worker: Worker, sim_port: int, jobs: int) -> dict[str, Any]:
    """Per-job counts: connections, Redis commands, AMQP socket ops, syscalls to each peer."""
    producer = env.producer
    names = {
        5672: "RabbitMQ",
        int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]): "Redis",
        sim_port: "Ollama",
    }
    procs = worker.processes()
    me = [psutil.Process()]
    trace_file = env.tmp / "strace.txt"
    fds = _fds(procs)
    tracer = _strace([p.pid for p in procs], trace_file)
    rabbit_before = _rabbit_counts(env.vhost)
    with _redis_monitor() as commands:
        for i in range(jobs):
            producer.generate(f"wire {i}").get(timeout=60)
    rabbit_after = _rabbit_counts(env.vhost)
    if tracer is not None:
        tracer.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            tracer.wait(timeout=15)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    procs = worker.processes()
    owners = _thread_owners(procs)
    redis_port = next(p for p, n in names.items() if n == "Redis")
    sides = {port: "worker" for port in _ports(procs, redis_port)}
    sides.update({port: "producer" for port in _ports(me, redis_port)})
    redis_counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for port, command, key in commands:
        side = sides.get(port)
        if side is None or command in ("MONITOR",):
            continue
        kind = command
        if command in ("GET", "SET", "SETEX", "MGET", "DEL"):
            kind += " lock" if ":lock:" in key else " result"
        redis_counts[(side, kind)] += 1
    rabbit: dict[str, list[int]] = {}
    amqp_sides = {port: "worker" for port in _ports(procs, 5672)}
    amqp_sides.update({port: "producer" for port in _ports(me, 5672)})
    for port, (recv, send) in rabbit_after.items():
        side = amqp_sides.get(port)
        if side is None:
            continue
        before = rabbit_before.get(port, (0, 0))
        totals = rabbit.setdefault(side, [0, 0])
        totals[0] += recv - before[0]
        totals[1] += send - before[1]
    syscalls: collections.Counter[str] = collections.Counter()
    connects: collections.Counter[str] = collections.Counter()
    if trace_file.exists():
        for line in trace_file.read_text(errors="replace").splitlines():
            match = _STRACE_LINE.match(line)
            if not match or ("resumed>" in line and "<..." not in line):
                continue
            tid, call, fd = int(match.group(1)), match.group(2), match.group(3)
            pid = owners.get(tid, tid)
            if call == "connect":
                found = re.search(r"htons\((\d+)\)", line)
                connects[names.get(int(found.group(1)), "other") if found else "unix"] += 1
                continue
            if call in ("fsync", "fdatasync"):
                syscalls["fsync/fdatasync (SQLite commit)"] += 1
                continue
            if call == "pwrite64":
                syscalls["pwrite64 (SQLite pages and WAL)"] += 1
                continue
            peer = fds.get((pid, int(fd))) if fd is not None else None
            if peer is not None:
                syscalls[f"socket sends to {names.get(peer, str(peer))}"] += 1
            else:
                syscalls["writes to pipes and files (pool IPC, log)"] += 1
        trace_file.unlink()
    per = 1.0 / jobs
    new_amqp = len(set(rabbit_after) - set(rabbit_before))
    return {
        "jobs": jobs,
        "new_amqp": new_amqp * per,
        "strace": tracer is not None,
        "connects": {k: v * per for k, v in connects.items()},
        "syscalls": {k: v * per for k, v in sorted(syscalls.items())},
        "redis": {f"{side}: {kind}": n * per for (side, kind), n in sorted(redis_counts.items())},
        "amqp": {side: (r * per, s * per) for side, (r, s) in rabbit.items()},
    }


# --- micro costs -----------------------------------------------------------------------------


def _timed(call: Callable[[int], Any], count: int) -> float:
    """Median milliseconds of ``call`` over ``count`` runs (after three warm ones)."""
    for i in range(3):
        call(i)
    times = []
    for i in range(count):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _micro(env: BenchEnv, count: int) -> list[tuple[str, float, str]]:
    """What the pieces cost alone, in-process, median ms per call."""
    results: list[tuple[str, float, str]] = []
    for pragma in ("FULL", "NORMAL"):
        path = env.tmp / f"micro-{pragma}.sqlite3"
        store = ResultStore(f"sqlite:///{path}", sqlite_path=str(path))
        store.migrate()

        def set_pragma(conn: Any, pragma: str = pragma) -> None:
            conn.execute(f"PRAGMA synchronous={pragma}")

        store._run(set_pragma)

        def record(i: int, store: ResultStore = store) -> None:
            store.record(
                job_key=f"generate:m{i}",
                job_id=f"m{i}",
                task_type="generate",
                share_id=None,
                status=JobStatus.STARTED,
                worker="bench",
            )

        results.append(
            (
                f"`ml_results` upsert, SQLite WAL, synchronous={pragma}",
                _timed(record, count),
                "two rows per job: STARTED and SUCCESS",
            )
        )
        store.close()
    exchange = Exchange("bench.micro", type="topic", durable=False, auto_delete=True)
    body = {"type": "task-succeeded", "uuid": str(uuid.uuid4()), "result": "x" * 600}
    for confirm in (True, False):
        with Connection(env.broker_url, transport_options={"confirm_publish": confirm}) as conn:
            publisher = conn.Producer(exchange=exchange, serializer="json")
            exchange(conn.default_channel).declare()

            def publish(_: int, publisher: Any = publisher) -> None:
                publisher.publish(body, routing_key="task.succeeded", delivery_mode=1)

            results.append(
                (
                    f"event-sized publish to RabbitMQ, {'with' if confirm else 'without'} confirm",
                    _timed(publish, count),
                    "a task event, with AVOCADO_TASK_EVENTS on: 4 per job (sent, received, "
                    "started, succeeded); none by default",
                )
            )
            exchange(conn.default_channel).delete()
    backend = env.producer.app.backend
    payload = {"text": "x" * 200, "model": "m", "worker": "w"}
    ids = [str(uuid.uuid4()) for _ in range(count + 3)]
    results.append(
        (
            "Celery Redis backend `store_result` (GET, then SET + PUBLISH)",
            _timed(lambda i: backend.store_result(ids[i], payload, "SUCCESS"), count),
            "once per job: SUCCESS (twice with `task_track_started`)",
        )
    )
    client = env.redis()
    try:
        results.append(
            (
                "Redis GET round trip",
                _timed(lambda i: client.get(f"{env.key_prefix}x{i}"), count),
                "the read Celery makes before each result write",
            )
        )
    finally:
        client.close()
    request = {"prompt": "hello", "model": "llama3.2:1b", "options": {}}
    result = {"job_id": "x", "text": "y" * 200, "model": "m", "worker": "w"}
    results.append(
        (
            "pydantic: request validated + result built and dumped",
            _timed(
                lambda _: (
                    validate_request(GenerateRequest, request),
                    GenerateResult(**result).model_dump(mode="json"),
                ),
                count * 5,
            ),
            "producer and worker validate once each",
        )
    )
    env.purge_results()
    return results


# --- profile ---------------------------------------------------------------------------------


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _servers(*names: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info.get("name") or "") in names]


def _cpu_per_job(
    groups: dict[str, Callable[[], list[psutil.Process]]], run: Callable[[], int]
) -> dict[str, float]:
    """CPU milliseconds per job of each group of processes while ``run`` does its jobs."""
    procs = {name: get() for name, get in groups.items()}
    before = {name: _cpu_seconds(p) for name, p in procs.items()}
    jobs = run()
    after = {name: _cpu_seconds(p) for name, p in procs.items()}
    return {name: 1000.0 * (after[name] - before[name]) / jobs for name in procs}


def _cpu_table(
    env: BenchEnv, cfg: Config, worker: Worker, bare: Worker, sim: Any
) -> dict[str, Any]:
    """Where the CPU of one job goes, fleet against bare Celery, sequential and in bursts."""
    from bench.scenarios import noop_app, noop_burst

    producer = env.producer
    noop = noop_app(env)
    confirm = env.settings.publish_timeout_s
    task = noop.tasks[NOOP_TASK]
    seq = 30 if cfg.quick else 150
    burst = 60 if cfg.quick else 300
    sim_proc = [psutil.Process(sim.process.pid)]
    me = [psutil.Process()]
    rabbit = _servers("beam.smp")
    redis_server = _servers("redis-server")
    columns: dict[str, dict[str, float]] = {}

    def groups(made: Worker, with_sim: bool) -> dict[str, Callable[[], list[psutil.Process]]]:
        found: dict[str, Callable[[], list[psutil.Process]]] = {
            "worker (main + pool)": made.processes,
            "harness: producer and result wait": lambda: me,
            "RabbitMQ (whole server)": lambda: rabbit,
            "Redis (whole server)": lambda: redis_server,
        }
        if with_sim:
            found["simulator"] = lambda: sim_proc
        return found

    def fleet_seq() -> int:
        for i in range(seq):
            producer.generate(f"cpu {i}").get(timeout=60)
        return seq

    def bare_seq() -> int:
        for i in range(seq):
            task.apply_async((i,), confirm_timeout=confirm).get(timeout=60)
        return seq

    try:
        noop_burst(noop, cfg.concurrency * 3, confirm)
        columns["fleet, sequential"] = _cpu_per_job(groups(worker, True), fleet_seq)
        columns["bare Celery, sequential"] = _cpu_per_job(groups(bare, False), bare_seq)
        columns["fleet, bursts"] = _cpu_per_job(
            groups(worker, True), lambda: (fleet_burst(producer, burst), burst)[1]
        )
        columns["bare Celery, bursts"] = _cpu_per_job(
            groups(bare, False), lambda: (noop_burst(noop, burst, confirm), burst)[1]
        )
    finally:
        noop.close()
    return {"cpu": columns, "cpu_seq": seq, "cpu_burst": burst}


def profile(env: BenchEnv, cfg: Config) -> dict[str, Any]:
    """Profiles of scenario 1 (sequential) and 3 (burst) plus wire counts and micro costs."""
    from bench.scenarios import noop_worker

    sim = env.start_sim(latency_ms=0, parallel=4)
    pool = cfg.default_pool
    worker = env.start_worker(
        pool=pool, concurrency=cfg.concurrency, ollama_url=sim.url, wait=False
    )
    bare_worker = noop_worker(env, cfg, pool, wait=False)
    producer = env.producer
    found: dict[str, Any] = {"pool": pool, "concurrency": cfg.concurrency}
    try:
        env.wait_ready(worker)
        env.wait_ready(bare_worker)
        warm_fleet(producer, cfg.concurrency)
        cfg.log("  CPU per job")
        found.update(_cpu_table(env, cfg, worker, bare_worker, sim))
        env.stop_worker(bare_worker)
        cfg.log("  py-spy, sequential jobs")
        found["spy_sequential"] = _spy(worker, cfg.profile_s, env.tmp, _sequential_load(producer))
        cfg.log("  py-spy, bursts")
        found["spy_burst"] = _spy(
            worker, cfg.profile_s, env.tmp, _burst_load(producer, min(cfg.dispatch_jobs, 200))
        )
        cfg.log("  pyinstrument, producer")
        found["producer"] = _producer_profile(producer, 40 if cfg.quick else 200)
        cfg.log("  wire counts")
        port = int(sim.url.rsplit(":", 1)[1])
        found["wire"] = _wire(env, worker, port, 15 if cfg.quick else 100)
        cfg.log("  singleton lock")
        found["lock_commands"] = _lock_commands(env, worker, 10 if cfg.quick else 50)
        found["lock_latency"] = _lock_latency(producer, cfg.reps, 15 if cfg.quick else 40)
    finally:
        env.stop_worker(bare_worker)
        env.stop_worker(worker)
        sim.stop()
    cfg.log("  micro costs")
    found["micro"] = _micro(env, 30 if cfg.quick else 300)
    return found


# --- fixes -----------------------------------------------------------------------------------

_CURRENT = "current fleet"
_BARE = "bare Celery no-op"
_ALL_UNDONE = tuple(UNDONE)
# (label, changes made by bench/fleet_app.py, kind)
VARIANTS: list[tuple[str, tuple[str, ...], str]] = [
    (_CURRENT, (), "current"),
    *((f"{name} undone", (name,), "undone") for name in UNDONE),
    ("the fleet before the fixes", _ALL_UNDONE, "undone"),
    *((f"candidate: {name}", (name,), "candidate") for name in CANDIDATES),
]


def _changed(names: tuple[str, ...]) -> str:
    if not names:
        return "nothing"
    if names == _ALL_UNDONE:
        return f"all {len(names)} applied fixes undone ({', '.join(names)})"
    return "; ".join(CHANGES[n] for n in names)


def fixes(env: BenchEnv, cfg: Config) -> dict[str, Any]:
    """Each applied fix undone, and each candidate made, in the real worker, measured in one
    rotation with the current fleet and bare Celery."""
    from bench.scenarios import noop_app, noop_burst, noop_worker

    sim = env.start_sim(latency_ms=0, parallel=4)
    pool = cfg.default_pool
    workers: list[tuple[str, Worker, Producer]] = []
    seq_jobs = 30 if cfg.quick else 50
    burst_jobs = 60 if cfg.quick else 120
    latency: dict[str, list[float]] = collections.defaultdict(list)
    rates: dict[str, list[float]] = collections.defaultdict(list)
    bare_worker = noop_worker(env, cfg, pool, wait=False)
    noop = noop_app(env)
    try:
        for label, names, _ in VARIANTS:
            made = env.start_worker(
                app="bench.fleet_app",
                pool=pool,
                concurrency=cfg.concurrency,
                ollama_url=sim.url,
                queues=f"bench.idle.{uuid.uuid4().hex[:6]}",
                env=environment(list(names)),
                wait=False,
            )
            # The producer's side of a setting the variant changes (task-sent events).
            producer = Producer(env.make_settings(task_events="events" in names))
            workers.append((label, made, producer))
        for _, made, _ in workers:
            env.wait_ready(made)
        env.wait_ready(bare_worker)

        def variant(label: str, made: Worker, producer: Producer) -> Callable[[int], None]:
            def run(rep: int) -> None:
                env.control(made, "add_consumer", queue="ml.generate")
                try:
                    if rep == 0:
                        warm_fleet(producer, cfg.concurrency)
                    times = []
                    for i in range(seq_jobs):
                        start = time.perf_counter()
                        producer.generate(f"fix {i}").get(timeout=60)
                        times.append(1000.0 * (time.perf_counter() - start))
                    latency[label].append(percentile(times, 50))
                    rates[label].append(burst_jobs / fleet_burst(producer, burst_jobs))
                finally:
                    env.control(made, "cancel_consumer", queue="ml.generate")

            return run

        def bare(rep: int) -> None:
            confirm = env.settings.publish_timeout_s
            task = noop.tasks[NOOP_TASK]
            if rep == 0:
                noop_burst(noop, cfg.concurrency * 3, confirm)
            times = []
            for i in range(seq_jobs):
                start = time.perf_counter()
                task.apply_async((i,), confirm_timeout=confirm).get(timeout=60)
                times.append(1000.0 * (time.perf_counter() - start))
            latency[_BARE].append(percentile(times, 50))
            rates[_BARE].append(burst_jobs / noop_burst(noop, burst_jobs, confirm))

        alternate(cfg.reps, *(variant(label, made, prod) for label, made, prod in workers), bare)
    finally:
        for _, made, producer in workers:
            env.stop_worker(made)
            producer.close()
        env.stop_worker(bare_worker)
        noop.close()
        sim.stop()
    base_latency = median(latency[_CURRENT])
    base_rate = median(rates[_CURRENT])
    rows = []
    for label, names, kind in [
        *VARIANTS,
        (_BARE, (), "bare"),
    ]:
        rows.append(
            {
                "variant": label,
                "kind": kind,
                "names": ",".join(names),
                "changed": _changed(names)
                if kind != "bare"
                else "the dispatch baseline: no fleet code, same broker, queue and backend",
                "p50 ms": median(latency[label]),
                "p50 vs current ms": median(latency[label]) - base_latency,
                "jobs/s": median(rates[label]),
                "jobs/s vs current": median(rates[label]) / base_rate,
            }
        )
    return {"fixes": rows, "fix_pool": pool, "fix_seq": seq_jobs, "fix_burst": burst_jobs}
