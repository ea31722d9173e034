"""The Docker stack run for real: ``scripts/start-ml-services.sh --docker --simulate`` brings up
RabbitMQ, Redis, PostgreSQL, the simulator in Ollama's place, Flower, the gateway, two workers
and beat in containers, each healthy; a job goes through the gateway while the worker container
running it is killed, and the other worker finishes it; the stack stops and starts again with
its results kept. The registry's images are stood in for by tests/docker/build.sh (no registry
is reachable from the CI machine). One test holds the stack's whole life: the suite runs tests
in parallel, and a second stack would only cost time."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from avocado_sim import OllamaSimulator, SimConfig
from tests.conftest import SHOWN
from tests.services import compose_env, free_port

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "scripts/start-ml-services.sh"
STOP = ROOT / "scripts/stop-ml-services.sh"
STANDINS = ROOT / "tests/docker/build.sh"
COMPOSE_FILES = ["docker/docker-compose.yml", "docker/docker-compose.ml.yml"]
# The first run on a machine builds the stand-ins (a Debian root) and the project's images
# (pip from PyPI): minutes; later runs find them cached.
pytestmark = pytest.mark.timeout(1200)

MODEL = "llama3.2:1b"
# 200 tokens at the simulator's 20 a second: ten seconds to kill its worker in.
LONG = {"model": MODEL, "prompt": "Tell me about avocados.", "options": {"num_predict": 200}}
RUNNING = {"rabbitmq", "redis", "postgres", "ollama", "flower", "infer", "worker", "beat"}


def _show(request: pytest.FixtureRequest, title: str, text: str) -> None:
    """Into the test run's log whether the test passes or not (CI's log shows the stack)."""
    request.node.add_report_section("call", SHOWN, f"----- {title}\n{text.rstrip()}\n")


def _run(
    *args: str | Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _standins() -> dict[str, str]:
    """RABBITMQ_IMAGE=... and the others, made (or found cached) by tests/docker/build.sh."""
    done = _run(STANDINS, env=dict(os.environ), timeout=900)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.split())


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A project of its own on free host ports (the machine's services keep theirs), fresh
    secrets, the stand-in images; its containers and volumes go at the end."""
    env = compose_env(
        **_standins(),
        COMPOSE_PROJECT_NAME=f"avocado-e2e-{uuid.uuid4().hex[:8]}",
        # Images built on the stand-ins are not a user's: never over their :latest.
        AVOCADO_IMAGE_TAG="e2e-standins",
        AVOCADO_RUN_DIR=str(tmp_path / "run"),
        AVOCADO_ENV_FILE=str(tmp_path / "absent.env"),
        RABBITMQ_DEFAULT_PASS=secrets.token_urlsafe(16),
        REDIS_PASSWORD=secrets.token_urlsafe(16),
        POSTGRES_PASSWORD=secrets.token_urlsafe(16),
        AVOCADO_FLOWER_PASSWORD=secrets.token_urlsafe(16),
    )
    for name in (
        "AVOCADO_RABBITMQ_PORT",
        "AVOCADO_RABBITMQ_MANAGEMENT_PORT",
        "AVOCADO_REDIS_PORT",
        "AVOCADO_POSTGRES_PORT",
        "AVOCADO_OLLAMA_PORT",
        "AVOCADO_FLOWER_PORT",
        "AVOCADO_INFER_PORT",
    ):
        env[name] = str(free_port())
    yield env
    files = [arg for file in COMPOSE_FILES for arg in ("-f", file)]
    project = ["-p", env["COMPOSE_PROJECT_NAME"]]
    down = _run(
        "docker-compose", *project, *files, "down", "-v", "--remove-orphans", env=env, timeout=300
    )
    assert down.returncode == 0, down.stderr


def _containers(env: dict[str, str], *filters: str) -> list[str]:
    project = f"label=com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}"
    args = ["docker", "ps", "-aq", "--filter", project]
    for extra in filters:
        args += ["--filter", extra]
    done = _run(*args, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _states(env: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """(service, state, health, exit code) of each container of the stack."""
    template = (
        '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} '
        "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}"
    )
    ids = _containers(env)
    done = _run("docker", "inspect", "-f", template, *ids, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return [
        (service, state, health, int(code))
        for service, state, health, code in (line.split() for line in done.stdout.splitlines())
    ]


def _docker_ps(env: dict[str, str]) -> str:
    project = f"label=com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}"
    table = "table {{.Names}}\t{{.Image}}\t{{.Status}}\t{{.Ports}}"
    done = _run("docker", "ps", "-a", "--filter", project, "--format", table, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _start(request: pytest.FixtureRequest, env: dict[str, str]) -> str:
    """The start script's output, and Compose's (its log)."""
    up = _run(START, "--docker", "--simulate", "--workers", "2", env=env, timeout=900)
    _show(
        request,
        "scripts/start-ml-services.sh --docker --simulate --workers 2",
        up.stdout + up.stderr,
    )
    _show(request, "docker ps", _docker_ps(env))
    assert up.returncode == 0, up.stderr
    assert "stack is up (Docker" in up.stdout
    assert "(the simulator)" in up.stdout
    return up.stdout + up.stderr + (Path(env["AVOCADO_RUN_DIR"]) / "compose-up.log").read_text()


def _assert_healthy(env: dict[str, str]) -> None:
    states = _states(env)
    running = [(s, h) for s, state, h, _ in states if state == "running"]
    assert sorted(s for s, _ in running) == sorted([*RUNNING, "worker"]), states
    assert all(health == "healthy" for _, health in running), states
    assert [(s, state, code) for s, state, _, code in states if state != "running"] == [
        ("ollama-pull", "exited", 0)
    ]


def _assert_no_secret_shown(env: dict[str, str], *outputs: str) -> None:
    """Neither the scripts' output, nor the containers' arguments (docker ps and docker
    inspect show them), nor their logs hold a secret."""
    containers = _containers(env)
    template = "{{json .Path}} {{json .Args}}"
    args = _run("docker", "inspect", "-f", template, *containers, env=env, timeout=60)
    assert args.returncode == 0, args.stderr
    no_trunc = _run("docker", "ps", "-a", "--no-trunc", env=env, timeout=60)
    logs = [_run("docker", "logs", container, env=env, timeout=60) for container in containers]
    shown = "\n".join(
        [*outputs, args.stdout, no_trunc.stdout, *(log.stdout + log.stderr for log in logs)]
    )
    for name in (
        "RABBITMQ_DEFAULT_PASS",
        "REDIS_PASSWORD",
        "POSTGRES_PASSWORD",
        "AVOCADO_FLOWER_PASSWORD",
    ):
        assert env[name] not in shown, name


def _api_key(env: dict[str, str]) -> str:
    """A key of the gateway, made as the compose file says: avocado keys create in its container."""
    [infer] = _containers(env, "label=com.docker.compose.service=infer")
    made = _run("docker", "exec", infer, "avocado", "keys", "create", "e2e", env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def _gateway(env: dict[str, str], key: str) -> httpx.Client:
    url = f"http://127.0.0.1:{env['AVOCADO_INFER_PORT']}"
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _reference_answer() -> str:
    """What the simulated model answers LONG, at full speed and uninterrupted."""
    with OllamaSimulator(SimConfig(models=[MODEL])) as sim:
        answer = httpx.post(f"{sim.url}/api/generate", json={**LONG, "stream": False}, timeout=60)
    answer.raise_for_status()
    return str(answer.json()["response"])


def _job_with_its_worker_killed(env: dict[str, str], gateway: httpx.Client) -> tuple[str, str, str]:
    """Stream LONG through the gateway, ``docker kill`` the worker container running it after
    its first pieces, read the answer to its end: (job id, the answer, the killed worker)."""
    with gateway.stream("POST", "/api/generate", json=LONG) as response:
        assert response.status_code == 200, response.read()
        job = response.headers["X-Avocado-Job-Id"]
        lines = response.iter_lines()
        pieces: list[dict[str, Any]] = [json.loads(next(lines)) for _ in range(5)]
        running = gateway.get(f"/jobs/{job}").json()
        assert (running["state"], running["attempts"]) == ("started", 1), running
        killed = running["worker"]
        # A worker's node is worker@<its container's hostname>, the container's short id.
        kill = _run("docker", "kill", killed.split("@", 1)[1], env=env, timeout=60)
        assert kill.returncode == 0, kill.stderr
        pieces += [json.loads(line) for line in lines if line]
    assert pieces[-1]["done"] is True, pieces[-1]
    return job, "".join(piece["response"] for piece in pieces), killed


def test_the_stack_in_containers(stack_env: dict[str, str], request: pytest.FixtureRequest) -> None:
    env = stack_env

    first = _start(request, env)
    _assert_healthy(env)
    gateway = _gateway(env, _api_key(env))
    job, answer, killed = _job_with_its_worker_killed(env, gateway)

    # The other worker continued the answer: nothing repeated, nothing missing.
    assert answer == _reference_answer()
    finished = gateway.get(f"/jobs/{job}").json()
    assert (finished["state"], finished["attempts"]) == ("success", 2), finished
    assert finished["worker"] not in {None, killed}, finished
    _show(request, f"docker ps after docker kill of {killed}'s container", _docker_ps(env))

    down = _run(STOP, env=env, timeout=300)
    _show(request, "scripts/stop-ml-services.sh", down.stdout + down.stderr)
    assert down.returncode == 0, down.stderr
    assert _containers(env) == []

    second = _start(request, env)
    _assert_healthy(env)
    # The key (Redis, its append-only file) and the job's row (PostgreSQL) were in volumes.
    kept = gateway.get(f"/jobs/{job}").json()
    assert (kept["state"], kept["attempts"], kept["worker"]) == (
        "success",
        2,
        finished["worker"],
    ), kept
    again = gateway.post(
        "/api/generate", json={"model": MODEL, "prompt": "Again?", "stream": False}
    )
    assert again.status_code == 200, again.text
    assert again.json()["done"] is True
    _assert_no_secret_shown(env, first, down.stdout + down.stderr, second)


def test_a_missing_secret_stops_compose_before_anything_starts(tmp_path: Path) -> None:
    """Refused by the start script, and by Compose itself when run by hand: no container, no
    volume, no network is made."""
    project = f"avocado-e2e-{uuid.uuid4().hex[:8]}"
    env = compose_env(
        COMPOSE_PROJECT_NAME=project,
        AVOCADO_RUN_DIR=str(tmp_path / "run"),
        AVOCADO_ENV_FILE=str(tmp_path / "absent.env"),
        RABBITMQ_DEFAULT_PASS="rabbit-e2e",
        POSTGRES_PASSWORD="postgres-e2e",
        AVOCADO_FLOWER_PASSWORD="flower-e2e",
    )

    script = _run(START, "--docker", "--simulate", env=env, timeout=120)
    files = [
        arg for file in [*COMPOSE_FILES, "docker/docker-compose.sim.yml"] for arg in ("-f", file)
    ]
    compose = _run("docker-compose", "-p", project, *files, "up", "-d", env=env, timeout=120)

    assert script.returncode == 1
    assert "REDIS_PASSWORD is not set" in script.stderr
    assert compose.returncode != 0
    assert "set REDIS_PASSWORD in .env (see .env.example)" in compose.stderr
    label = f"label=com.docker.compose.project={project}"
    for kind in ("container", "volume", "network"):
        listed = _run(
            "docker",
            kind,
            "ls",
            "-aq" if kind == "container" else "-q",
            "--filter",
            label,
            env=env,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.split() == [], kind
