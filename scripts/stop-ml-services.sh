#!/usr/bin/env bash
# Stop what scripts/start-ml-services.sh started: each process group, gently, then for sure.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUN="${AVOCADO_RUN_DIR:-$ROOT/run}"

# Seconds each may take to stop after SIGTERM. A worker finishes its current jobs (or they go
# back to the queue when it is killed); Flower 2.2 logs its shutdown but a thread of its keeps
# the process alive, and it has nothing to save, so it gets a short grace.
grace() {
  case "$1" in
    worker) echo 60 ;;
    flower) echo 3 ;;
    *) echo 15 ;;
  esac
}

stop_one() {
  local name=$1 pidfile="$RUN/$1.pid" pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < $(grace "$name") * 4; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null && [ "$name" != flower ]; then
      say "$name did not stop within $(grace "$name")s: killing it"
    fi
  fi
  # Children (prefork pool processes) may outlive their parent: end the whole group.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  say "stopped $name"
}

# Workers first, so they return unfinished jobs while the broker is still there.
for name in worker beat flower ollama-sim ollama; do stop_one "$name"; done
