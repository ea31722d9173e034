"""The Docker stack as Compose sees it: docker-compose.yml merged with the ml overlay (and the
simulator's or the GPUs' overlay), read by a real Compose (Debian's docker-compose 1.29, which
needs no engine for ``config``) and checked against the Compose Specification's JSON schema;
the images' Dockerfiles, the RabbitMQ config and .env.example beside them.
tests/e2e/test_docker_stack.py starts the stack for real."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from avocado_infer import InferSettings
from avocado_shared.settings import Settings
from ollama_worker.settings import WorkerSettings
from tests.services import compose_env

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
FILES = [DOCKER / "docker-compose.yml", DOCKER / "docker-compose.ml.yml"]
# The simulator in place of Ollama, and Ollama on the GPUs: on top of FILES.
SIM = DOCKER / "docker-compose.sim.yml"
GPU = DOCKER / "docker-compose.gpu.yml"
OVERLAYS = [SIM, GPU]
SCHEMA = ROOT / "tests/data/compose-spec.json"
ENV_EXAMPLE = ROOT / ".env.example"

# Values the tests pass for the required secrets, to find them where they must arrive.
SECRETS = {
    "RABBITMQ_DEFAULT_PASS": "rabbit-secret-1a",
    "REDIS_PASSWORD": "redis-secret-2b",
    "POSTGRES_PASSWORD": "postgres-secret-3c",
    "AVOCADO_FLOWER_PASSWORD": "flower-secret-4d",
}
# Behind the "observability" profile: started only when asked for.
OBSERVABILITY = {"prometheus", "grafana"}
LONG_RUNNING = {
    "rabbitmq",
    "redis",
    "postgres",
    "flower",
    "infer",
    "ollama",
    "worker",
    "beat",
    *OBSERVABILITY,
}
ONE_SHOTS = {"ollama-pull"}


def _compose_exe() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is missing: run scripts/test.sh, which installs Debian's "
            "(apt-get install --no-install-recommends docker-compose)"
        )
    return exe


def _config(
    env: dict[str, str], env_file: Path, *overlays: Path
) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of both files and the overlays, as the start script runs
    Compose."""
    args = [_compose_exe(), "-p", "spicy-avocado", "--env-file", str(env_file)]
    for file in [*FILES, *overlays]:
        args += ["-f", str(file)]
    return subprocess.run(
        [*args, "config"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def merged(empty_env_file: Path) -> dict[str, Any]:
    """The merged configuration, with the required secrets in the environment."""
    done = _config(compose_env(**SECRETS), empty_env_file)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def services(merged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = merged["services"]
    return found


@cache
def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _schema_errors(document: object) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in _validator().iter_errors(document)
    ]


def test_compose_merges_the_files_into_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == LONG_RUNNING | ONE_SHOTS


@pytest.mark.parametrize("path", [*FILES, *OVERLAYS, "merged"], ids=lambda p: getattr(p, "name", p))
def test_follows_the_compose_specification(path: Path | str, merged: dict[str, Any]) -> None:
    document = merged if path == "merged" else yaml.safe_load(Path(path).read_text())

    assert _schema_errors(document) == []


def test_the_schema_rejects_what_compose_would() -> None:
    """The vendored schema is strict where it matters: a misspelt key is an error."""
    typo = {"services": {"a": {"image": "x", "healthcheck": {"tset": ["CMD", "true"]}}}}
    bad_condition = {
        "services": {
            "a": {"image": "x", "depends_on": {"b": {"condition": "service_happy"}}},
            "b": {"image": "x"},
        }
    }

    assert _schema_errors(typo)
    assert _schema_errors(bad_condition)


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_a_missing_secret_stops_compose(missing: str, empty_env_file: Path) -> None:
    unset = {k: v for k, v in SECRETS.items() if k != missing}
    empty = {**SECRETS, missing: ""}

    without = _config(compose_env(**unset), empty_env_file)
    blank = _config(compose_env(**empty), empty_env_file)

    for done in (without, blank):
        assert done.returncode != 0
        assert f"set {missing} in .env (see .env.example)" in done.stderr
        assert done.stdout == ""


def test_secrets_have_no_default_anywhere() -> None:
    """Each use of a secret is required (``${NAME:?...}``), so no file falls back to a value."""
    for source in [*FILES, *OVERLAYS]:
        uses = re.findall(r"\$\{([A-Z_]+)(\W{0,2})", source.read_text())
        for name, operator in uses:
            if name in SECRETS:
                assert operator == ":?", f"{source.name}: ${{{name}{operator}...}}"


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert services[name]["restart"] == "unless-stopped", name
    for name in ONE_SHOTS:
        assert services[name]["restart"] == "no", name


def test_dependants_wait_for_health(services: dict[str, dict[str, Any]]) -> None:
    edges = {
        (name, dep): spec["condition"]
        for name, service in services.items()
        for dep, spec in service.get("depends_on", {}).items()
    }

    for (name, dep), condition in edges.items():
        if dep in ONE_SHOTS:
            assert condition == "service_completed_successfully", (name, dep)
        else:
            assert condition == "service_healthy", (name, dep)
            assert services[dep].get("healthcheck"), f"{name} waits on {dep}, which has none"
    assert {dep for name, dep in edges if name == "worker"} == {
        "rabbitmq",
        "redis",
        "postgres",
        "ollama",
        "ollama-pull",
    }
    assert ("beat", "rabbitmq") in edges
    assert {("flower", "rabbitmq"), ("flower", "redis")} <= set(edges)
    assert {dep for name, dep in edges if name == "infer"} == {"rabbitmq", "redis", "postgres"}
    assert ("ollama-pull", "ollama") in edges


def test_no_guest_credentials_anywhere(merged: dict[str, Any]) -> None:
    sources = [*FILES, DOCKER / "rabbitmq/rabbitmq.conf", ENV_EXAMPLE]

    assert "guest" not in yaml.safe_dump(merged).lower()
    for source in sources:
        assert "guest" not in source.read_text().lower(), source
    rabbit = merged["services"]["rabbitmq"]["environment"]
    assert rabbit["RABBITMQ_DEFAULT_USER"] == "avocado"
    assert rabbit["RABBITMQ_DEFAULT_PASS"] == SECRETS["RABBITMQ_DEFAULT_PASS"]


def test_secrets_come_from_the_environment_only(services: dict[str, dict[str, Any]]) -> None:
    """Every secret in the merged config is the value the environment gave; none is written
    in the compose files."""
    env = {name: services[name].get("environment", {}) for name in services}

    assert env["postgres"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    # Redis reads its password from its standard input: docker ps shows its arguments.
    assert SECRETS["REDIS_PASSWORD"] not in " ".join(services["redis"]["command"])
    # (config prints the shell's "$" with Compose's escape)
    assert "requirepass $$REDISCLI_AUTH" in services["redis"]["command"][-1]
    assert env["redis"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    assert env["flower"]["FLOWER_BASIC_AUTH"] == f"avocado:{SECRETS['AVOCADO_FLOWER_PASSWORD']}"
    for source in FILES:
        text = source.read_text()
        for secret in [*SECRETS.values(), "change-me"]:
            assert secret not in text, source


def test_worker_and_beat_talk_to_the_stack(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker", "beat"):
        env = services[name]["environment"]

        assert env["AVOCADO_BROKER_URL"] == (
            f"amqp://avocado:{SECRETS['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672//"
        )
        assert env["AVOCADO_REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        assert env["AVOCADO_DATABASE_URL"] == (
            f"postgresql://avocado:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/avocado"
        )
        assert env["AVOCADO_OLLAMA_URL"] == "http://ollama:11434"
        assert env["AVOCADO_METRICS_PORT"] == "9808"
        assert env["AVOCADO_METRICS_HOST"] == "0.0.0.0"  # noqa: S104 (inside the stack)
        # Every other variable is passed on, not set to an empty string (which the settings
        # would take as a value).
        assert "" not in env.values()
    worker = services["worker"]
    assert worker["command"][:4] == ["celery", "-A", "ollama_worker", "worker"]
    assert not any("concurrency" in arg for arg in worker["command"])  # AVOCADO_SLOTS says
    assert worker["environment"]["AVOCADO_SLOTS"] == "4"
    assert services["ollama"]["environment"]["OLLAMA_NUM_PARALLEL"] == "4"
    assert "--hostname=worker@%h" in worker["command"]
    assert [str(port) for port in worker["expose"]] == ["9808"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "ollama_worker", "beat"]
    assert services["flower"]["command"][:4] == ["celery", "-A", "ollama_worker", "flower"]
    pull = services["ollama-pull"]["environment"]
    assert pull == {"OLLAMA_HOST": "ollama:11434", "AVOCADO_DEFAULT_MODEL": "llama3.2:1b"}


def test_infer_talks_to_the_stack(services: dict[str, dict[str, Any]]) -> None:
    """The gateway publishes to the stack's broker and reads its Redis, listens on every
    interface of its container at 11435, and is healthy when its /readyz answers 200."""
    infer = services["infer"]
    env = infer["environment"]

    assert env["AVOCADO_BROKER_URL"] == (
        f"amqp://avocado:{SECRETS['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672//"
    )
    assert env["AVOCADO_REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert env["AVOCADO_DATABASE_URL"] == (
        f"postgresql://avocado:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/avocado"
    )
    assert env["AVOCADO_INFER_HOST"] == "0.0.0.0"  # noqa: S104 (inside the stack)
    assert env["AVOCADO_INFER_PORT"] == "11435"
    assert env["AVOCADO_DEFAULT_MODEL"] == "llama3.2:1b"
    assert "" not in env.values()
    assert infer["healthcheck"]["test"] == ["CMD", "avocado-healthcheck", "infer"]
    assert [str(port) for port in infer["ports"]] == ["127.0.0.1:11435:11435/tcp"]
    assert infer["restart"] == "unless-stopped"
    assert infer["init"] is True


def test_infer_reads_only_settings_that_exist(services: dict[str, dict[str, Any]]) -> None:
    """Each variable given to the gateway is a field of its settings or the fleet's (a typo
    would be ignored in silence), and each of its own settings can be given."""
    env = services["infer"]["environment"]
    given = yaml.safe_load(FILES[0].read_text())["services"]["infer"]["environment"]
    raw = {name for name in given if not name.startswith("OTEL_")}  # OpenTelemetry's own
    own = {f"AVOCADO_INFER_{name.upper()}" for name in InferSettings.model_fields} - {
        "AVOCADO_INFER_FLEET"
    }
    fleet = {f"AVOCADO_{name.upper()}" for name in Settings.model_fields}

    assert set(raw) <= own | fleet, sorted(set(raw) - own - fleet)
    assert own <= set(raw), sorted(own - set(raw))
    # Only what the environment sets reaches the container (Compose drops the rest).
    assert set(env) <= set(given)


def test_infer_port_moves_the_published_port_only(empty_env_file: Path) -> None:
    done = _config(compose_env(**SECRETS, AVOCADO_INFER_PORT="12000"), empty_env_file)

    assert done.returncode == 0, done.stderr
    infer = yaml.safe_load(done.stdout)["services"]["infer"]
    assert [str(port) for port in infer["ports"]] == ["127.0.0.1:12000:11435/tcp"]
    assert infer["environment"]["AVOCADO_INFER_PORT"] == "11435"


@pytest.mark.parametrize(
    ("dockerfile", "names"),
    [("Dockerfile.worker", ["worker", "beat", "flower"]), ("Dockerfile.infer", ["infer"])],
)
def test_images_are_built_from_their_dockerfiles(
    services: dict[str, dict[str, Any]], dockerfile: str, names: list[str]
) -> None:
    for name in names:
        build = services[name]["build"]

        assert Path(build["context"]) == ROOT, name
        assert build["dockerfile"] == f"docker/{dockerfile}", name
        assert services[name]["image"] == services[names[0]]["image"]
        assert services[name]["init"] is True
    assert services["infer"]["image"] != services["worker"]["image"]


def test_consumer_timeout_matches_the_settings(services: dict[str, dict[str, Any]]) -> None:
    conf = _rabbitmq_conf()
    default_s = Settings.model_fields["consumer_timeout_s"].default

    assert int(conf["consumer_timeout"]) == default_s * 1000
    for name in ("worker", "beat", "infer"):
        assert services[name]["environment"]["AVOCADO_CONSUMER_TIMEOUT_S"] == str(default_s)
    limits = ("generate_time_limit_s", "summarize_time_limit_s")
    assert all(Settings.model_fields[f].default < default_s for f in limits)
    assert float(conf["vm_memory_high_watermark.relative"]) < 1
    assert conf["disk_free_limit.absolute"].endswith("GB")
    mounts = services["rabbitmq"]["volumes"]
    assert any(
        str(m).startswith(f"{DOCKER / 'rabbitmq/rabbitmq.conf'}:/etc/rabbitmq/rabbitmq.conf:ro")
        for m in mounts
    ), mounts


def _rabbitmq_conf() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / "rabbitmq/rabbitmq.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_redis_persists_with_append_only_file(services: dict[str, dict[str, Any]]) -> None:
    command = services["redis"]["command"][-1]

    assert "--appendonly yes" in command
    assert "redis-data:/data" in _volume_specs(services["redis"])


def test_data_lives_in_named_volumes(merged: dict[str, Any]) -> None:
    services = merged["services"]
    expected = {
        "rabbitmq": "rabbitmq-data:/var/lib/rabbitmq",
        "redis": "redis-data:/data",
        "postgres": "postgres-data:/var/lib/postgresql/data",
        "ollama": "ollama-models:/root/.ollama",
        "prometheus": "prometheus-data:/prometheus",
        "infer": "infer-files:/var/lib/avocado/files",
    }

    for name, spec in expected.items():
        assert spec in _volume_specs(services[name]), name
    assert set(merged["volumes"]) == {spec.split(":")[0] for spec in expected.values()}


def _volume_specs(service: dict[str, Any]) -> list[str]:
    """Each mount as source:target, whichever syntax the Compose output uses."""
    specs = []
    for mount in service.get("volumes", []):
        if isinstance(mount, dict):
            specs.append(f"{mount['source']}:{mount['target']}")
        else:
            specs.append(":".join(str(mount).split(":")[:2]))
    return specs


def test_ollama_reserves_the_gpus_only_with_their_overlay(
    services: dict[str, dict[str, Any]], empty_env_file: Path
) -> None:
    """An engine without NVIDIA's runtime refuses a container that reserves a GPU: the base
    files start Ollama anywhere, docker-compose.gpu.yml gives it the GPUs."""
    done = _config(compose_env(**SECRETS), empty_env_file, GPU)

    assert done.returncode == 0, done.stderr
    ollama = yaml.safe_load(done.stdout)["services"]["ollama"]
    devices = ollama["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["ollama"]
    assert services["ollama"]["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    assert services["ollama"]["image"] == "ollama/ollama:latest"


def test_the_simulator_stands_in_for_ollama(
    services: dict[str, dict[str, Any]], empty_env_file: Path
) -> None:
    """With docker-compose.sim.yml the workers reach the simulator where Ollama was: its own
    image, the default model, the Host it is asked by, and nothing to pull."""
    done = _config(compose_env(**SECRETS), empty_env_file, SIM)

    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)["services"]
    sim = merged["ollama"]
    assert sim["image"] == "spicy-avocado-sim:latest"
    assert sim["build"]["dockerfile"] == "docker/Dockerfile.sim"
    assert sim["command"][0] == "avocado-ollama-sim"
    assert {"--models=llama3.2:1b", "--allowed-hosts=ollama", "--tokens-per-s=20"} <= set(
        sim["command"]
    )
    assert sim["healthcheck"]["test"][:2] == ["CMD", "python3"]
    assert merged["ollama-pull"]["image"] == sim["image"]
    assert merged["ollama-pull"]["command"] == ["true"]
    assert merged["worker"]["environment"] == services["worker"]["environment"]


def test_ports_are_published_on_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = {
        name: [str(port) for port in service.get("ports", [])] for name, service in services.items()
    }

    assert published["flower"] == ["127.0.0.1:5555:5555/tcp"]
    assert published["infer"] == ["127.0.0.1:11435:11435/tcp"]
    assert "127.0.0.1:5672:5672/tcp" in published["rabbitmq"]
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), (name, port)
    assert published["worker"] == [], "scaled workers cannot share a host port"


def test_prometheus_and_grafana_come_only_with_their_profile(
    services: dict[str, dict[str, Any]],
) -> None:
    """Prometheus scrapes the gateway's and every worker's metrics port; Grafana is
    provisioned with the dashboards' files."""
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"], name
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = _volume_specs(services["grafana"])
    assert {m.split(":")[0] for m in mounts} == {
        str(DOCKER / "grafana/provisioning"),
        str(DOCKER / "grafana/dashboards"),
    }
    scrape = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    infer_port = services["infer"]["environment"]["AVOCADO_INFER_PORT"]
    worker_port = int(services["worker"]["environment"]["AVOCADO_METRICS_PORT"])
    assert jobs["avocado-infer"]["static_configs"] == [{"targets": [f"infer:{infer_port}"]}]
    assert jobs["avocado-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": worker_port}
    ]


# The service whose image each variable names, and the official image it names by default.
IMAGES = {
    "RABBITMQ_IMAGE": ("rabbitmq", "rabbitmq:4-management"),
    "REDIS_IMAGE": ("redis", "redis:7-alpine"),
    "POSTGRES_IMAGE": ("postgres", "postgres:17-alpine"),
    "OLLAMA_IMAGE": ("ollama", "ollama/ollama:latest"),
    "PROMETHEUS_IMAGE": ("prometheus", "prom/prometheus:latest"),
    "GRAFANA_IMAGE": ("grafana", "grafana/grafana:latest"),
}
BUILT = ["flower", "infer", "worker", "beat"]


def test_every_image_from_a_registry_can_be_named(
    services: dict[str, dict[str, Any]], empty_env_file: Path
) -> None:
    """The official images by default; a mirror's (or a machine's own stand-ins) when named,
    the base of the project's images too."""
    named = {variable: f"mirror/{service}:1" for variable, (service, _) in IMAGES.items()}
    done = _config(compose_env(**SECRETS, **named, PYTHON_IMAGE="mirror/python:3"), empty_env_file)

    assert done.returncode == 0, done.stderr
    moved = yaml.safe_load(done.stdout)["services"]
    for variable, (service, official) in IMAGES.items():
        assert services[service]["image"] == official, variable
        assert moved[service]["image"] == named[variable], variable
    assert moved["ollama-pull"]["image"] == named["OLLAMA_IMAGE"]
    for service in BUILT:
        assert services[service]["build"]["args"] == {"PYTHON_IMAGE": "python:3.11-slim"}
        assert moved[service]["build"]["args"] == {"PYTHON_IMAGE": "mirror/python:3"}


# Each published port's variable, the service and the port inside its container.
PORTS = {
    "AVOCADO_RABBITMQ_PORT": ("rabbitmq", 5672),
    "AVOCADO_RABBITMQ_MANAGEMENT_PORT": ("rabbitmq", 15672),
    "AVOCADO_REDIS_PORT": ("redis", 6379),
    "AVOCADO_POSTGRES_PORT": ("postgres", 5432),
    "AVOCADO_OLLAMA_PORT": ("ollama", 11434),
    "AVOCADO_FLOWER_PORT": ("flower", 5555),
    "AVOCADO_INFER_PORT": ("infer", 11435),
}


def test_every_published_port_can_be_moved(empty_env_file: Path) -> None:
    """A host that runs RabbitMQ, Redis or PostgreSQL itself keeps its ports: the stack
    publishes each of its own on the host port its variable says."""
    moved = {variable: str(30001 + i) for i, variable in enumerate(PORTS)}
    done = _config(compose_env(**SECRETS, **moved), empty_env_file)

    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for variable, (service, inside) in PORTS.items():
        published = [str(port) for port in services[service]["ports"]]
        assert f"127.0.0.1:{moved[variable]}:{inside}/tcp" in published, variable


# --------------------------------------------------------------------------- Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in logical.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


DOCKERFILE = DOCKER / "Dockerfile.worker"
INFER_DOCKERFILE = DOCKER / "Dockerfile.infer"


@pytest.mark.parametrize(
    ("dockerfile", "package"),
    [(DOCKERFILE, "python/ollama-worker"), (INFER_DOCKERFILE, "python/infer")],
    ids=["worker", "infer"],
)
def test_image_installs_only_its_two_packages(dockerfile: Path, package: str) -> None:
    steps = _instructions(dockerfile)
    copies = {
        src: dest
        for kind, args in steps
        if kind == "COPY"
        for src, dest in [shlex.split(args)[-2:]]
    }
    installs = [
        shlex.split(command.strip())
        for kind, args in steps
        if kind == "RUN"
        for command in args.split("&&")
        if "pip install" in command
    ]

    assert steps[:2] == [("ARG", "PYTHON_IMAGE=python:3.11-slim"), ("FROM", "${PYTHON_IMAGE}")]
    assert set(copies) == {"python/shared", package, "docker/healthcheck.py"}
    assert len(installs) == 1
    install = installs[0]
    options = [arg for arg in install[install.index("install") + 1 :] if arg.startswith("-")]
    targets = [arg for arg in install[install.index("install") + 1 :] if not arg.startswith("-")]
    assert options == ["--no-cache-dir"]
    assert targets == [copies["python/shared"], copies[package]]
    text = " ".join(args for _, args in steps).lower()
    for tool in ("pytest", "ruff", "mypy", "nbclient", "ipykernel", "--group", "requirements"):
        assert tool not in text, tool


def test_simulator_image_installs_only_the_simulator() -> None:
    steps = _instructions(DOCKER / "Dockerfile.sim")
    copies = [shlex.split(args)[-2] for kind, args in steps if kind == "COPY"]

    assert steps[:2] == [("ARG", "PYTHON_IMAGE=python:3.11-slim"), ("FROM", "${PYTHON_IMAGE}")]
    assert copies == ["python/simulator"]
    assert dict(steps)["USER"] not in {"root", "0"}
    assert json.loads(dict(steps)["CMD"])[0] == "avocado-ollama-sim"


def test_worker_image_runs_the_worker_unprivileged_and_checks_it() -> None:
    steps = dict(_instructions(DOCKERFILE))
    envs = [args for kind, args in _instructions(DOCKERFILE) if kind == "ENV"]

    assert steps["USER"] not in {"root", "0"}
    assert any("PYTHONUNBUFFERED=1" in env.split() for env in envs)
    assert steps["HEALTHCHECK"].endswith('CMD ["avocado-healthcheck", "worker"]')
    assert json.loads(steps["CMD"])[:4] == ["celery", "-A", "ollama_worker", "worker"]


def test_infer_image_runs_the_gateway_unprivileged_and_checks_it() -> None:
    steps = dict(_instructions(INFER_DOCKERFILE))
    envs = " ".join(args for kind, args in _instructions(INFER_DOCKERFILE) if kind == "ENV")

    assert steps["USER"] not in {"root", "0"}
    assert {"PYTHONUNBUFFERED=1", "AVOCADO_INFER_HOST=0.0.0.0", "AVOCADO_INFER_PORT=11435"} <= set(
        envs.split()
    )
    assert steps["EXPOSE"] == "11435"
    assert steps["HEALTHCHECK"].endswith('CMD ["avocado-healthcheck", "infer"]')
    assert json.loads(steps["CMD"]) == ["avocado-infer"]


def test_dockerignore_keeps_the_build_context_clean() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    expected = {".git", ".venv", ".env", "run/", "**/__pycache__", "**/.pytest_cache"}
    assert expected <= entries
    assert {"**/*.sqlite3", ".mypy_cache", ".ruff_cache"} <= entries


# --------------------------------------------------------------------------- .env.example


def _env_example() -> dict[str, tuple[str, str]]:
    """NAME -> (value, the comment line above it), for NAME=value and # NAME=value lines."""
    found = {}
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found[match[1]] = (match[2], previous)
        else:
            previous = line
    return found


def _env_names(name: str) -> list[str]:
    """The variables a settings field is read from."""
    choices = getattr(WorkerSettings.model_fields[name].validation_alias, "choices", None)
    return [str(choice) for choice in choices] if choices else [f"AVOCADO_{name.upper()}"]


def _referenced_variables() -> set[str]:
    """Variables the compose files interpolate and the scripts read."""
    names = set()
    for file in [*FILES, *OVERLAYS]:
        names.update(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", file.read_text()))
    for script in (ROOT / "scripts").glob("*.sh"):
        names.update(re.findall(r"\b(AVOCADO_[A-Z0-9_]+)", script.read_text()))
    return names


def test_env_example_lists_every_variable_with_a_comment() -> None:
    listed = _env_example()

    unlisted_fields = [
        name
        for name in WorkerSettings.model_fields
        if not any(env in listed for env in _env_names(name))
    ]
    unlisted = _referenced_variables() - set(listed)
    assert not unlisted_fields, f".env.example lacks the settings {unlisted_fields}"
    assert not unlisted, f".env.example lacks {sorted(unlisted)}"
    for name, (_, comment) in listed.items():
        assert comment.startswith("# "), f"{name} has no comment"
        assert len(comment) > 3, f"{name} has no comment"


def test_env_example_holds_placeholders_not_secrets() -> None:
    listed = _env_example()
    secret_fields = [
        next(env for env in _env_names(name) if env in listed)
        for name, field in WorkerSettings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    ]
    secret_like = [name for name in listed if re.search(r"PASS|TOKEN", name)]

    assert len(secret_fields) >= 6
    for name in {*secret_fields, *secret_like, *SECRETS}:
        value = listed[name][0]
        assert "change-me" in value, f"{name}={value} is not a placeholder"


def test_env_example_is_enough_for_compose() -> None:
    done = _config(compose_env(), ENV_EXAMPLE)

    assert done.returncode == 0, done.stderr
