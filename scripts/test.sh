#!/usr/bin/env bash
# Everything the tests need, from a fresh clone: virtualenv, local services, lint, types, tests.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k summary
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_venv
ensure_services
ensure_docker_compose_v1
command -v rabbitmqctl >/dev/null || [ -x /usr/sbin/rabbitmqctl ] || die "rabbitmqctl missing"
export PATH="$VENV/bin:$PATH:/usr/sbin"

say "ruff"; ruff check python tests docker; ruff format --check -q python tests docker
say "mypy"; mypy
if command -v shellcheck >/dev/null; then say "shellcheck"; shellcheck scripts/*.sh; fi
say "pytest"; exec pytest "$@"
