#!/usr/bin/env bash
# Bring up the fleet on this machine: services, Ollama (real or simulated), a worker, beat, Flower.
# Idempotent: what already runs is left alone. scripts/stop-ml-services.sh stops what this started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<USAGE
usage: scripts/start-ml-services.sh [--simulate] [--concurrency N]

  --simulate       run the built-in Ollama simulator instead of a real Ollama
  --concurrency N  worker processes (default: 1, one LLM job at a time per GPU)

Ollama: a server answering at \$AVOCADO_OLLAMA_URL (default http://127.0.0.1:11434) is used;
else an installed 'ollama' binary is started; else use --simulate.
USAGE
}

SIMULATE=0
CONCURRENCY="${AVOCADO_WORKER_CONCURRENCY:-1}"
while [ $# -gt 0 ]; do
  case "$1" in
    --simulate) SIMULATE=1 ;;
    --concurrency) CONCURRENCY="${2:?--concurrency needs a number}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

RUN="${AVOCADO_RUN_DIR:-$ROOT/run}"
OLLAMA_URL="${AVOCADO_OLLAMA_URL:-http://127.0.0.1:11434}"
FLOWER_PORT="${AVOCADO_FLOWER_PORT:-5555}"
mkdir -p "$RUN"
cd "$ROOT"

ensure_venv
ensure_services
export PATH="$VENV/bin:$PATH"
export AVOCADO_OLLAMA_URL="$OLLAMA_URL"

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# Start a command in its own session (so stop can end its whole process group).
start_bg() {
  local name=$1; shift
  if running "$name"; then say "$name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  setsid nohup "$@" >>"$RUN/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

wait_until() { # seconds what command...
  local seconds=$1 what=$2 i; shift 2
  for ((i = 0; i < seconds * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  die "$what did not become healthy within ${seconds}s; see its log in $RUN"
}

ollama_up() {
  "$VENV/bin/python" -c "import httpx, sys; httpx.get(sys.argv[1] + '/api/version', timeout=2).raise_for_status()" "$OLLAMA_URL" >/dev/null 2>&1
}
hostport=${OLLAMA_URL#*://}; hostport=${hostport%%/*}
OLLAMA_HOST_ONLY=${hostport%:*}; OLLAMA_PORT=${hostport##*:}

if [ "$SIMULATE" = 1 ]; then
  if ! running ollama-sim && ollama_up; then
    die "something already answers at $OLLAMA_URL; stop it, or drop --simulate to use it"
  fi
  start_bg ollama-sim avocado-ollama-sim --host "$OLLAMA_HOST_ONLY" --port "$OLLAMA_PORT" \
    --models "${AVOCADO_DEFAULT_MODEL:-llama3.2:1b}"
  wait_until 30 "the Ollama simulator" ollama_up
  OLLAMA_KIND="simulator"
elif ollama_up; then
  OLLAMA_KIND="Ollama (already running)"
elif command -v ollama >/dev/null; then
  OLLAMA_HOST="$hostport" start_bg ollama ollama serve
  wait_until 60 "ollama serve" ollama_up
  OLLAMA_KIND="Ollama (started here)"
else
  die "no Ollama answers at $OLLAMA_URL and no 'ollama' binary is installed.
  Either install Ollama (https://ollama.com/download) and run this again,
  or point AVOCADO_OLLAMA_URL at a running Ollama,
  or run: scripts/start-ml-services.sh --simulate   (built-in simulator, no GPU needed)"
fi

NODE="worker1@$(hostname)"
start_bg worker celery -A ollama_worker worker --loglevel INFO --hostname "$NODE" \
  --concurrency "$CONCURRENCY"
start_bg beat celery -A ollama_worker beat --loglevel INFO --schedule "$RUN/beat-schedule"
start_bg flower celery -A ollama_worker flower --address=127.0.0.1 --port="$FLOWER_PORT"

wait_until 90 "the worker $NODE" celery -A ollama_worker inspect ping --destination "$NODE" --timeout 2
wait_until 30 "celery beat" grep -q "beat: Starting" "$RUN/beat.log"
wait_until 60 "Flower" "$VENV/bin/python" -c "import httpx; httpx.get('http://127.0.0.1:$FLOWER_PORT/healthcheck', timeout=2).raise_for_status()"

cat <<DONE
Spicy Avocado fleet is up.
  Ollama:  $OLLAMA_URL ($OLLAMA_KIND)
  worker:  $NODE, concurrency $CONCURRENCY
  Flower:  http://127.0.0.1:$FLOWER_PORT
  logs and pid files: $RUN

Submit a job:
  source .venv/bin/activate
  avocado generate "Why is the sky blue?" --wait
  avocado summarize --share-id demo-1 --text "Paste a long text here." --wait

Stop everything: scripts/stop-ml-services.sh
DONE
