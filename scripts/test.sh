#!/usr/bin/env bash
# Everything the tests need, from a fresh clone: virtualenv, local services (RabbitMQ 3 and 4),
# a Docker engine, lint, types, tests.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k summary
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_venv
ensure_embedded # the real-model tests run SmolLM2-135M on llama.cpp
ensure_services
# RabbitMQ 4 beside the machine's broker: the broker tests run on both (the first run on a
# machine builds its Debian 13 root, about a minute; later runs reuse it).
export AVOCADO_TEST_RABBIT4_PORT="${AVOCADO_TEST_RABBIT4_PORT:-5673}"
"$ROOT/scripts/rabbitmq-node.sh" start --port "$AVOCADO_TEST_RABBIT4_PORT"
ensure_docker_compose_v1
# The Compose stack runs for real (tests/e2e/test_docker_stack.py): an engine, started here
# (installed with apt when missing); its stand-in images are built by the test, cached.
ensure_docker_engine
ensure_chromium # the web page's browser tests
command -v rabbitmqctl >/dev/null || [ -x /usr/sbin/rabbitmqctl ] || die "rabbitmqctl missing"
export PATH="$VENV/bin:$PATH:/usr/sbin"
# Bytecode caches on, even where the environment turns them off (some notebook and CI images
# do): else each of the suite's ~150 Python processes compiles the project from source and
# each pytest process rewrites the asserts of ~400 plugin modules again, a minute of CPU.
unset PYTHONDONTWRITEBYTECODE

say "ruff"; ruff check python tests docker; ruff format --check -q python tests docker
say "mypy"; mypy
if command -v shellcheck >/dev/null; then say "shellcheck"; shellcheck scripts/*.sh; fi
# Five processes on two cores: much of a test's time is spent waiting on brokers, workers
# and simulated generations (with four, a quarter of the CPU sat idle; with five, 15%). Each
# takes the next test when it is free (worksteal), so the long ones (the cluster, the
# SIGKILLs, the e2e scripts) overlap with everything else.
say "pytest"; exec pytest -n 5 --dist worksteal "$@"
