#!/usr/bin/env bash
# Stop what scripts/start-ml-services.sh started: the compose stack (its data volumes are
# kept) and the processes of the native fleet, each process group gently, then for sure.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ALL_PARTS=services,ollama,worker,beat,flower,infer

usage() {
  cat <<USAGE
usage: scripts/stop-ml-services.sh [--native | --docker] [--only PARTS]

  --docker      stop the compose stack only
  --native      stop the native processes only (default: both, whichever runs)
  --only PARTS  stop only these parts, a comma list of $ALL_PARTS

The stack's volumes (RabbitMQ, Redis, PostgreSQL data, Ollama models) are kept; remove them
with: docker compose -p spicy-avocado -f docker/docker-compose.yml -f docker/docker-compose.ml.yml down -v
USAGE
}

load_env_file AVOCADO_RUN_DIR
MODE=both
ONLY=$ALL_PARTS
while [ $# -gt 0 ]; do
  case "$1" in
    --native) MODE=native ;;
    --docker) MODE=docker ;;
    --only) ONLY="${2:?--only needs a comma list of parts: $ALL_PARTS}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
for part in ${ONLY//,/ }; do compose_services "$part" >/dev/null; done
has_part() { [[ ",$ONLY," == *",$1,"* ]]; }
RUN="${AVOCADO_RUN_DIR:-$ROOT/run}"

# ---------------------------------------------------------------------------------- Docker
stop_docker() {
  if ! docker_engine_up; then
    [ "$MODE" != docker ] || die "--docker: no Docker engine answers ('docker info' failed)"
    return 0
  fi
  [ -n "$(compose_containers)" ] || return 0
  # Compose interpolates the whole file, even to stop it: required secrets need a value.
  local name
  for name in RABBITMQ_DEFAULT_PASS REDIS_PASSWORD POSTGRES_PASSWORD AVOCADO_FLOWER_PASSWORD; do
    load_env_file "$name"
    [ -n "${!name:-}" ] || export "$name=unused-for-stop"
  done
  set_compose
  mkdir -p "$RUN"
  if [ "$ONLY" = "$ALL_PARTS" ]; then
    "${COMPOSE[@]}" down --remove-orphans >"$RUN/compose-down.log" 2>&1 \
      || { tail -n 30 "$RUN/compose-down.log" >&2; die "docker compose down failed"; }
  else
    local services=() names=() part
    # The gateway first, so no job is published into a stack that is stopping; then workers,
    # so they return unfinished jobs while the broker is still there.
    for part in infer worker beat flower ollama services; do
      if has_part "$part"; then
        read -ra names <<<"$(compose_services "$part")"
        services+=("${names[@]}")
      fi
    done
    if ! { "${COMPOSE[@]}" stop "${services[@]}" && "${COMPOSE[@]}" rm -f "${services[@]}"; } \
      >"$RUN/compose-down.log" 2>&1; then
      tail -n 30 "$RUN/compose-down.log" >&2
      die "docker compose stop failed"
    fi
  fi
  say "stopped the Docker stack ($ONLY)"
}

# ---------------------------------------------------------------------------------- native
# Seconds each may take to stop after SIGTERM. A worker finishes its current jobs (or they go
# back to the queue when it is killed); Flower 2.2 logs its shutdown but a thread of its keeps
# the process alive, and it has nothing to save, so it gets a short grace. The gateway (uvicorn)
# lets its open responses finish, then exits by the SIGTERM it re-raises (status 143: its clean
# exit, not a failure); a stream still open when its grace ends is cut, and its job goes on.
grace() {
  case "$1" in
    worker*) echo 60 ;;
    flower) echo 3 ;;
    *) echo 15 ;;
  esac
}

stop_one() {
  local name=$1 pidfile="$RUN/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    if ! await_exit "$pid" $(($(grace "$name") * 10)) && [ "$name" != flower ]; then
      say "$name did not stop within $(grace "$name")s: killing it"
    fi
  fi
  # Children (prefork pool processes) may outlive their parent: end the whole group.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  say "stopped $name"
}

# Stop each of its arguments at once, and wait for all.
stop_together() {
  local name
  for name in "$@"; do stop_one "$name" & done
  wait
}

stop_native() {
  [ -d "$RUN" ] || return 0
  local names=() pidfile
  # The gateway first, so it publishes no more jobs; then the workers, which finish or return
  # their jobs, with beat and Flower; the model server last, once no worker asks it anything.
  # The native start leaves RabbitMQ, Redis and PostgreSQL to the system: they stay.
  if has_part infer; then stop_one infer; fi
  if has_part worker; then
    for pidfile in "$RUN"/worker*.pid; do
      [ -e "$pidfile" ] || continue
      names+=("$(basename "$pidfile" .pid)")
    done
  fi
  if has_part beat; then names+=(beat); fi
  if has_part flower; then names+=(flower); fi
  stop_together "${names[@]}"
  if has_part ollama; then stop_together ollama-sim ollama embedded-llm; fi
}

if [ "$MODE" != native ]; then stop_docker; fi
if [ "$MODE" != docker ]; then stop_native; fi
