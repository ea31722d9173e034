"""The start command (README.md, docs/operations.md), as a user runs it: fleet up, jobs through
RabbitMQ, Flower behind basic auth, fleet down; and the Docker path, driven against a stand-in
``docker``."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from avocado_shared import Settings
from tests.gateway import InProcessGateway
from tests.services import free_port, run_cli, service_env

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "scripts/start-ml-services.sh"
STOP = ROOT / "scripts/stop-ml-services.sh"
# Each test starts and stops a fleet (broker checks, workers, beat, Flower, the gateway, a
# model server): on a machine busy with the rest of the suite, more than the default 120 s
# that guards a test against hanging.
pytestmark = pytest.mark.timeout(300)


def _live_stat(proc: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None when the
    process is gone or a zombie waiting to be reaped."""
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def _ours(run_dir: Path) -> list[str]:
    """Processes still alive whose pid file the start script wrote."""
    return [
        pidfile.stem
        for pidfile in run_dir.glob("*.pid")
        if _live_stat(Path("/proc", pidfile.read_text().strip())) is not None
    ]


def _group_members(pids: list[int]) -> list[int]:
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        fields = _live_stat(proc)
        if fields is not None and int(fields[2]) in pids:
            members.append(int(proc.name))
    return members


def _command_lines(pids: list[int]) -> str:
    """The argv of every process in these process groups, as ``ps`` shows them to anyone."""
    lines = []
    for pid in _group_members(pids):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return "\n".join(lines)


def _run(
    script: Path, env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def fleet_env(broker_url: str, key_prefix: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = service_env(
        broker_url,
        key_prefix,
        AVOCADO_RUN_DIR=str(tmp_path / "run"),
        AVOCADO_VENV=str(Path(sys.executable).parent.parent),
        AVOCADO_OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
        AVOCADO_FLOWER_PORT=str(free_port()),
        AVOCADO_INFER_PORT=str(free_port()),
        AVOCADO_METRICS_PORT="0",
        # The scripts read no .env of the developer's.
        AVOCADO_ENV_FILE=str(tmp_path / "absent.env"),
    )
    yield env
    subprocess.run([STOP, "--native"], env=env, timeout=180, check=False)


def _flower(env: dict[str, str], path: str, auth: tuple[str, str] | None) -> httpx.Response:
    url = f"http://127.0.0.1:{env['AVOCADO_FLOWER_PORT']}{path}"
    return httpx.get(url, auth=auth, timeout=10)


def _gateway(env: dict[str, str], key: str | None = None) -> httpx.Client:
    """A client of the gateway the start script runs, sending ``key`` when given."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    url = f"http://127.0.0.1:{env['AVOCADO_INFER_PORT']}"
    return httpx.Client(base_url=url, headers=headers, timeout=120)


def _gateway_down(env: dict[str, str]) -> bool:
    try:
        _gateway(env).get("/healthz")
    except httpx.ConnectError:
        return True
    return False


def _env_file(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of a file the start script wrote."""
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def _credentials(run_dir: Path) -> tuple[str, str]:
    lines = _env_file(run_dir / "flower.credentials")
    return lines["AVOCADO_FLOWER_USER"], lines["AVOCADO_FLOWER_PASSWORD"]


def test_start_simulate_runs_jobs_and_stop_leaves_nothing(fleet_env: dict[str, str]) -> None:
    run_dir = Path(fleet_env["AVOCADO_RUN_DIR"])
    gateway_url = f"http://127.0.0.1:{fleet_env['AVOCADO_INFER_PORT']}"

    up = _run(START, fleet_env, "--simulate", "--workers", "2")
    again = _run(START, fleet_env, "--simulate", "--workers", "2")

    assert up.returncode == 0, up.stderr + up.stdout
    assert "fleet is up" in up.stdout
    assert f"http://127.0.0.1:{fleet_env['AVOCADO_FLOWER_PORT']}" in up.stdout
    assert re.search(r"workers: worker1@\S+ worker2@\S+, as many jobs at once as", up.stdout), (
        up.stdout
    )
    assert re.search(rf"gateway: {gateway_url} .*ready in \d+\.\d s\)", up.stdout), up.stdout
    assert f"curl {gateway_url}/api/generate" in up.stdout
    assert again.returncode == 0, again.stderr
    assert "worker1 already running" in again.stdout
    assert "worker2 already running" in again.stdout
    assert "infer already running" in again.stdout
    assert sorted(_ours(run_dir)) == ["beat", "flower", "infer", "ollama-sim", "worker1", "worker2"]
    pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]

    key_file = run_dir / "infer.key"
    key = _env_file(key_file)["key"]
    body = {"model": "llama3.2:1b", "prompt": "Hi", "stream": False}
    with _gateway(fleet_env) as keyless_client, _gateway(fleet_env, key) as gateway:
        ready = gateway.get("/readyz")
        keyless = keyless_client.post("/api/generate", json=body)
        answer = gateway.post("/api/generate", json=body)
        page = keyless_client.get("/ui")
        fleet_view = gateway.get("/ui/api/fleet")
    # The gateway asks for a key; the script made one, kept in a 0600 file, never shown.
    assert f"API key in {key_file}" in up.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in up.stdout + up.stderr + again.stdout + again.stderr
    assert _env_file(key_file)["key"] == key, "a second start keeps the key"
    assert keyless.status_code == 401
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True
    stored = run_cli(fleet_env, "result", answer.headers["x-avocado-job-id"], "--json")
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["text"] == answer.json()["response"] != ""
    # The web page the summary names loads without a key; its data asks for one.
    assert f"web UI:  {gateway_url}/ui  (chat and the fleet; sign in with the API key in " in (
        up.stdout
    )
    assert page.status_code == 200
    assert "<title>Spicy Avocado</title>" in page.text
    nodes = [n["worker"].split("@")[0] for n in fleet_view.json()["nodes"]["items"]]
    assert sorted(nodes) == ["worker1", "worker2"]

    gen = run_cli(fleet_env, "generate", "Why is the sky blue?", "--wait")
    summ = run_cli(fleet_env, "summarize", "--share-id", "demo-1", "--text", "Sky.", "--wait")

    assert gen.returncode == 0, gen.stderr
    assert re.search(r"on worker[12]@", gen.stderr), gen.stderr
    assert summ.returncode == 0, summ.stderr
    assert summ.stdout.strip()

    down = _run(STOP, fleet_env, timeout=180)

    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines()[0] == "stopped infer", "the gateway stops first"
    assert "killing it" not in down.stdout
    assert _ours(run_dir) == []
    assert _group_members(pids) == []
    assert _gateway_down(fleet_env)
    # uvicorn's last words after SIGTERM: it shut down, it was not killed.
    assert "Finished server process" in (run_dir / "infer.log").read_text()


def test_flower_needs_the_generated_credentials(fleet_env: dict[str, str]) -> None:
    """Without AVOCADO_FLOWER_PASSWORD the start script makes one, keeps it in a 0600 file,
    says where, and never shows it: not in its output, a log or a command line. (With
    AVOCADO_INFER=false, which leaves the gateway out.)"""
    run_dir = Path(fleet_env["AVOCADO_RUN_DIR"])
    fleet_env["AVOCADO_INFER"] = "false"

    up = _run(START, fleet_env, "--simulate")
    assert up.returncode == 0, up.stderr + up.stdout
    user, password = _credentials(run_dir)
    again = _run(START, fleet_env, "--simulate")
    pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]

    assert "infer" not in _ours(run_dir)
    assert "gateway:" not in up.stdout
    assert _gateway_down(fleet_env)

    assert user == "avocado"
    assert len(password) >= 24
    assert stat.S_IMODE((run_dir / "flower.credentials").stat().st_mode) == 0o600
    assert f"password from {run_dir / 'flower.credentials'}" in up.stdout
    assert again.returncode == 0, again.stderr
    assert "flower already running" in again.stdout
    assert _credentials(run_dir) == (user, password), "a second start keeps the password"
    assert _flower(fleet_env, "/", (user, password)).status_code == 200
    assert _flower(fleet_env, "/", None).status_code == 401
    assert _flower(fleet_env, "/", (user, "not-the-password")).status_code == 401
    assert _flower(fleet_env, "/api/workers", None).status_code == 401

    metrics = _flower(fleet_env, "/metrics", (user, password))
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE flower_worker_online gauge" in metrics.text
    assert "# TYPE flower_events_total counter" in metrics.text
    # Flower 2.2 serves /metrics and /healthcheck to anyone: the Docker stack publishes its
    # port on loopback only, and the native fleet listens on 127.0.0.1.
    assert _flower(fleet_env, "/metrics", None).status_code == 200
    shown = up.stdout + up.stderr + again.stdout + again.stderr
    shown += "".join(log.read_text(errors="replace") for log in run_dir.glob("*.log"))
    shown += _command_lines(pids)
    assert password not in shown


def test_only_flower_with_a_given_password(fleet_env: dict[str, str]) -> None:
    run_dir = Path(fleet_env["AVOCADO_RUN_DIR"])
    env = {**fleet_env, "AVOCADO_FLOWER_USER": "ops", "AVOCADO_FLOWER_PASSWORD": "given-pw-7Qx"}

    up = _run(START, env, "--native", "--only", "flower")
    other_env = {**env, "AVOCADO_FLOWER_PASSWORD": "another-pw-9Zy"}
    other = _run(START, other_env, "--native", "--only", "flower")

    assert up.returncode == 0, up.stderr + up.stdout
    assert _ours(run_dir) == ["flower"]
    assert not (run_dir / "flower.credentials").exists()
    assert "(user ops, password from AVOCADO_FLOWER_PASSWORD)" in up.stdout
    assert "given-pw-7Qx" not in up.stdout + up.stderr
    assert _flower(env, "/", ("ops", "given-pw-7Qx")).status_code == 200
    assert _flower(env, "/", ("avocado", "given-pw-7Qx")).status_code == 401
    assert other.returncode == 1
    assert "refuses the credentials from AVOCADO_FLOWER_PASSWORD" in other.stderr
    assert "another-pw-9Zy" not in other.stdout + other.stderr

    down = _run(STOP, env, "--native", "--only", "flower")

    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "stopped flower"
    assert _ours(run_dir) == []


def test_gateway_that_cannot_start_is_reported(fleet_env: dict[str, str]) -> None:
    """Its port taken by another program: the start script refuses before it starts anything.
    An address it cannot bind (the gateway exits at once): the script fails with the end of
    its log. Either way nothing is left running."""
    run_dir = Path(fleet_env["AVOCADO_RUN_DIR"])
    port = int(fleet_env["AVOCADO_INFER_PORT"])
    unbindable = {**fleet_env, "AVOCADO_INFER_HOST": "192.0.2.1"}  # TEST-NET-1: not ours

    with socket.create_server(("127.0.0.1", port)):
        taken = _run(START, fleet_env, "--simulate")
    assert _ours(run_dir) == []
    exited = _run(START, unbindable, "--native", "--only", "infer")

    assert taken.returncode == 1
    assert f"something already listens on 127.0.0.1:{port}" in taken.stderr
    assert "AVOCADO_INFER_PORT" in taken.stderr
    assert exited.returncode == 1
    assert "avocado-infer exited before it was ready" in exited.stderr
    assert "192.0.2.1" in exited.stderr, "the end of its log is shown"
    assert _ours(run_dir) == []


def test_the_healthcheck_reads_the_gateways_readyz(
    gateway_factory: Callable[..., InProcessGateway], settings: Settings
) -> None:
    """``avocado-healthcheck infer``, which Compose and the start script run: 0 when /readyz
    answers 200; 1 naming what the gateway cannot reach when it answers 503."""
    cut_off = settings.model_copy(
        update={"broker_url": SecretStr(f"amqp://guest:guest@127.0.0.1:{free_port()}//")}
    )
    ready = gateway_factory()
    unready = gateway_factory(fleet=cut_off, ready_timeout_s=1)

    good = _healthcheck("infer", f"{ready.url}/readyz")
    bad = _healthcheck("infer", f"{unready.url}/readyz")
    nobody = _healthcheck("infer", f"http://127.0.0.1:{free_port()}/readyz")

    assert (good.returncode, good.stderr) == (0, "")
    assert bad.returncode == 1
    assert f"avocado-infer at {unready.url}/readyz answered 503" in bad.stderr
    assert '"broker"' in bad.stderr
    assert nobody.returncode == 1
    assert "does not answer" in nobody.stderr


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "docker/healthcheck.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_start_without_ollama_runs_the_embedded_model(fleet_env: dict[str, str]) -> None:
    """No Ollama answers and none is installed: the fleet runs on SmolLM2-135M (llama.cpp),
    and README.md's first jobs print a real model's answers, as does the gateway."""
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin"
    env = {
        **fleet_env,
        "PATH": path,
        "AVOCADO_EMBEDDED_PORT": str(free_port()),
        "AVOCADO_EMBEDDED_THREADS": "1",  # the suite's CPU is busy: no threads spinning
    }
    run_dir = Path(env["AVOCADO_RUN_DIR"])

    up = _run(START, env, "--native", "--only", "ollama,worker,infer")

    assert up.returncode == 0, up.stdout + up.stderr
    assert "smollm2-135m-instruct" in up.stdout
    assert "(embedded, llama.cpp on the CPU)" in up.stdout
    server = (run_dir / "embedded-llm.pid").read_text().strip()  # the script's child became it
    argv = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    config = json.loads(Path(argv[argv.index(b"--config_file") + 1].decode()).read_text())
    assert {(m["n_threads"], m["n_threads_batch"]) for m in config["models"]} == {(1, 1)}
    key = _env_file(run_dir / "infer.key")["key"]
    with _gateway(env, key) as gateway:
        tags = gateway.get("/api/tags").json()
        chat = gateway.post(
            "/api/chat",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                "options": {"num_predict": 24},
                "stream": False,
            },
        )
    assert "smollm2-135m-instruct" in [model["name"] for model in tags["models"]]
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "smollm2-135m-instruct"
    assert 0 < chat.json()["eval_count"] <= 24
    assert chat.json()["message"]["content"].strip()
    generated = run_cli(
        fleet_env,
        "generate",
        "Why is the sky blue?",
        "--model",  # the fleet's model: a producer's default is its own environment's
        "smollm2-135m-instruct",
        "-o",
        "num_predict=48",
        "--wait",
        "--json",
    )
    assert generated.returncode == 0, generated.stderr
    answer = json.loads(generated.stdout)
    assert answer["model"] == "smollm2-135m-instruct"
    assert 0 < answer["completion_tokens"] <= 48
    assert re.search(r"\b(the|is|of|and|light)\b", answer["text"].lower()), answer["text"]
    text = " ".join(
        ["The sky looks blue because air scatters the short blue waves of sunlight"] * 6
    )
    summary = run_cli(
        fleet_env,
        "summarize",
        "--share-id",
        f"sky-{free_port()}",
        "--text",
        text,
        "--model",
        "smollm2-135m-instruct",
        "--wait",
    )
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.strip()
    assert "smollm2-135m-instruct" in summary.stderr
    # README's embedding: the embedded server's all-MiniLM-L6-v2, 384 dimensions.
    embedded = run_cli(
        fleet_env, "embed", "A man is playing a guitar.", "Someone plays the guitar.", "--wait"
    )
    assert embedded.returncode == 0, embedded.stderr
    assert [len(vector) for vector in json.loads(embedded.stdout)] == [384, 384]

    down = _run(STOP, env, "--native")

    assert down.returncode == 0, down.stderr
    assert _ours(run_dir) == []


# --------------------------------------------------------------------------- Docker path

# A stand-in for the docker client: an engine that answers, Compose as a plugin, and a
# stack whose containers report the health FAKE_DOCKER_HEALTH says (or whose up fails with
# FAKE_DOCKER_UP_ERROR). Every call is logged with the environment Compose would interpolate.
FAKE_DOCKER = """\
import json, os, sys
args = sys.argv[1:]
state = os.environ["FAKE_DOCKER_STATE"]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    seen = {k: v for k, v in os.environ.items()
            if k.startswith(("AVOCADO_", "RABBITMQ_", "REDIS_", "POSTGRES_"))}
    log.write(json.dumps({"args": args, "env": seen}) + "\\n")
containers = {"c1": "rabbitmq running healthy 0", "c2": "ollama-pull exited none 0",
              "c3": "worker running " + os.environ.get("FAKE_DOCKER_HEALTH", "healthy") + " 0"}
if args[:1] == ["compose"] and "up" in args:
    if os.environ.get("FAKE_DOCKER_UP_ERROR"):
        sys.exit(os.environ["FAKE_DOCKER_UP_ERROR"])
    open(state, "w").close()
if args[:1] == ["compose"] and "down" in args and os.path.exists(state):
    os.remove(state)
if args[:2] == ["ps", "-aq"] and os.path.exists(state):
    print("\\n".join(containers))
if args[:1] == ["inspect"]:
    print(containers[args[-1]])
"""

DOCKER_SECRETS = {
    "RABBITMQ_DEFAULT_PASS": "rabbit-pw-e2e",
    "REDIS_PASSWORD": "redis-pw-e2e",
    "POSTGRES_PASSWORD": "postgres-pw-e2e",
    "AVOCADO_FLOWER_PASSWORD": "flower-pw-e2e",
}


@pytest.fixture
def docker_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``docker`` is the stand-in, and no .env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVOCADO_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_DOCKER_LOG=str(tmp_path / "docker.log"),
        FAKE_DOCKER_STATE=str(tmp_path / "stack-up"),
        AVOCADO_RUN_DIR=str(tmp_path / "run"),
        AVOCADO_ENV_FILE=str(tmp_path / "absent.env"),
    )
    return env


def _docker_calls(env: dict[str, str]) -> list[dict[str, Any]]:
    log = Path(env["FAKE_DOCKER_LOG"])
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _compose_calls(env: dict[str, str], verb: str) -> list[dict[str, Any]]:
    return [
        call
        for call in _docker_calls(env)
        if call["args"][:1] == ["compose"] and verb in call["args"]
    ]


def test_docker_path_starts_the_compose_stack_and_stops_it(docker_env: dict[str, str]) -> None:
    env = {**docker_env, **DOCKER_SECRETS}

    up = _run(START, env, "--workers", "3", "--concurrency", "2", timeout=60)

    assert up.returncode == 0, up.stderr + up.stdout
    assert "stack is up (Docker, project spicy-avocado)" in up.stdout
    assert "3 container(s) x 2 jobs at once" in up.stdout
    assert "Flower:     http://127.0.0.1:5555" in up.stdout
    assert "gateway:    http://127.0.0.1:11435" in up.stdout
    assert "web UI:     http://127.0.0.1:11435/ui" in up.stdout
    [call] = _compose_calls(env, "up")
    args = call["args"]
    assert args[:3] == ["compose", "-p", "spicy-avocado"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "-f"] == [
        str(ROOT / "docker/docker-compose.yml"),
        str(ROOT / "docker/docker-compose.ml.yml"),
    ]
    assert args[args.index("up") :][:3] == ["up", "-d", "--build"]
    assert args[-2:] == ["flower", "infer"]
    assert "--scale" in args
    assert args[args.index("--scale") + 1] == "worker=3"
    assert call["env"]["AVOCADO_SLOTS"] == "2"
    for secret in DOCKER_SECRETS.values():
        assert secret not in up.stdout + up.stderr

    # Stopping needs no secret: Compose only has to read the files.
    down = _run(STOP, docker_env, timeout=60)

    assert down.returncode == 0, down.stderr
    assert "stopped the Docker stack" in down.stdout
    [call] = _compose_calls(env, "down")
    assert call["args"][-2:] == ["down", "--remove-orphans"]


def test_docker_path_without_the_gateway(docker_env: dict[str, str]) -> None:
    env = {**docker_env, **DOCKER_SECRETS, "AVOCADO_INFER": "false"}

    up = _run(START, env, "--docker", timeout=60)

    assert up.returncode == 0, up.stderr
    [call] = _compose_calls(env, "up")
    assert "infer" not in call["args"]
    assert call["args"][-1] == "flower"
    assert "gateway:" not in up.stdout


def test_docker_path_only_some_parts(docker_env: dict[str, str]) -> None:
    """Only the parts asked for are waited on: a worker that died earlier is not theirs."""
    env = {**docker_env, **DOCKER_SECRETS, "FAKE_DOCKER_HEALTH": "unhealthy"}

    up = _run(START, env, "--docker", "--only", "services,flower", timeout=60)

    assert up.returncode == 0, up.stderr
    [call] = _compose_calls(env, "up")
    assert call["args"][-4:] == ["rabbitmq", "redis", "postgres", "flower"]
    assert "--scale" not in call["args"]
    assert "Flower:" in up.stdout
    assert "workers:" not in up.stdout


@pytest.mark.parametrize(
    ("change", "args", "message"),
    [
        ({"REDIS_PASSWORD": ""}, [], "REDIS_PASSWORD is not set"),
        ({"POSTGRES_PASSWORD": "change-me-postgres"}, [], "POSTGRES_PASSWORD is still the"),
        ({"AVOCADO_GPU": "maybe"}, [], "AVOCADO_GPU must be true, false or auto"),
        (
            {"FAKE_DOCKER_UP_ERROR": "listen tcp4 127.0.0.1:6379: bind: address already in use"},
            [],
            "port 6379 is taken on this host: move the stack's with AVOCADO_REDIS_PORT",
        ),
        (
            {
                "FAKE_DOCKER_UP_ERROR": "Pulling ollama (ollama/ollama:latest)...\n"
                'Get "https://registry-1.docker.io/v2/": dial tcp: no such host'
            },
            [],
            "an image could not be pulled: name one this host can reach with its *_IMAGE",
        ),
        ({"FAKE_DOCKER_HEALTH": "unhealthy"}, [], "worker is unhealthy"),
        ({}, ["--only", "worker,gpu"], "unknown part 'gpu'"),
        ({}, ["--workers", "0"], "--workers needs a whole number"),
        ({"AVOCADO_INFER": "maybe"}, [], "AVOCADO_INFER must be true or false"),
    ],
    ids=[
        "missing-secret",
        "placeholder",
        "bad-gpu",
        "port-taken",
        "no-registry",
        "unhealthy",
        "bad-part",
        "no-workers",
        "bad-switch",
    ],
)
def test_docker_path_refuses_loudly(
    docker_env: dict[str, str], change: dict[str, str], args: list[str], message: str
) -> None:
    env = {**docker_env, **DOCKER_SECRETS, **change}

    done = _run(START, env, *args, timeout=60)

    assert done.returncode == 1
    assert message in done.stderr
    assert "stack is up" not in done.stdout


@pytest.mark.parametrize(
    ("args", "change", "overlay"),
    [
        (["--docker", "--simulate"], {}, "sim"),
        (["--docker", "--simulate"], {"AVOCADO_GPU": "true"}, "sim"),
        (["--docker"], {"AVOCADO_GPU": "true"}, "gpu"),
    ],
    ids=["simulator", "simulator-not-gpu", "gpu"],
)
def test_docker_path_overlays(
    docker_env: dict[str, str], args: list[str], change: dict[str, str], overlay: str
) -> None:
    """--simulate puts the simulator in Ollama's place; the GPUs' overlay comes when asked
    for (or when the engine has NVIDIA's runtime), never over the simulator."""
    env = {**docker_env, **DOCKER_SECRETS, **change}

    up = _run(START, env, *args, timeout=60)

    assert up.returncode == 0, up.stderr
    [call] = _compose_calls(env, "up")
    files = [call["args"][i + 1] for i, a in enumerate(call["args"]) if a == "-f"]
    assert files[2:] == [str(ROOT / f"docker/docker-compose.{overlay}.yml")]
    assert ("(the simulator)" in up.stdout) == (overlay == "sim")


def test_without_a_docker_engine_docker_is_refused(tmp_path: Path) -> None:
    """Whether or not this machine runs an engine: the one DOCKER_HOST names does not answer,
    and is not this machine's to install or start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVOCADO_")}
    env.update(
        DOCKER_SECRETS,
        DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock",
        AVOCADO_RUN_DIR=str(tmp_path / "run"),
        AVOCADO_ENV_FILE=str(tmp_path / "absent.env"),
    )

    done = _run(START, env, "--docker", timeout=60)

    assert done.returncode == 1
    assert "no Docker engine answers" in done.stderr
    assert "stack is up" not in done.stdout
