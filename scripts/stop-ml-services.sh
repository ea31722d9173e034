#!/usr/bin/env bash
# Stop what scripts/start-ml-services.sh started: each process group, gently, then for sure.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUN="${AVOCADO_RUN_DIR:-$ROOT/run}"

stop_one() {
  local name=$1 pidfile="$RUN/$1.pid" pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name did not stop within 30s: killing it"
    fi
  fi
  # Children (prefork pool processes) may outlive their parent: end the whole group.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  say "stopped $name"
}

# Workers first, so they return unfinished jobs while the broker is still there.
for name in worker beat flower ollama-sim ollama; do stop_one "$name"; done
