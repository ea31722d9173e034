#!/usr/bin/env bash
# Everything the tests need, from a fresh clone: virtualenv, local services, lint, types, tests.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k summary
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_venv
ensure_services
command -v rabbitmqctl >/dev/null || [ -x /usr/sbin/rabbitmqctl ] || die "rabbitmqctl missing"
export PATH="$VENV/bin:$PATH:/usr/sbin"

say "ruff"; ruff check python tests; ruff format --check -q python tests
say "mypy"; mypy
say "pytest"; exec pytest "$@"
