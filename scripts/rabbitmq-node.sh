#!/usr/bin/env bash
# RabbitMQ nodes of our own beside the machine's broker, for tests that need RabbitMQ 4, a
# broker to restart or kill, TLS or a cluster. RabbitMQ 4 runs from a Debian 13 root made with
# debootstrap and cached outside the clone (AVOCADO_RABBITMQ4_ROOT); --v3 runs a node of the
# machine's own rabbitmq-server. Each node has its own name, ports and data directory.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<USAGE
usage: scripts/rabbitmq-node.sh build
       scripts/rabbitmq-node.sh start|stop|kill|wipe|dir|ctl [--v3] [--name NAME] [options] [-- ARGS]

  build              make the RabbitMQ 4 root once (debootstrap, about a minute); later calls reuse it
  start              start the node unless it runs; waits until it serves AMQP
  stop               stop it cleanly (rabbitmqctl stop); nothing when it is not running
  kill               SIGKILL it, as when its machine vanishes
  wipe               kill it (its data goes, so a clean stop would only cost time) and delete
                     its data directory
  dir                print the host path of its data directory (files for --conf go there)
  ctl -- ARGS        run rabbitmqctl ARGS against it (also: queues -- ARGS, diagnostics -- ARGS)

  --v3               a node of this machine's rabbitmq-server instead of RabbitMQ 4
  --name NAME        node name without @localhost (default avocado4, or avocado3 with --v3)
  --port PORT        AMQP port on 127.0.0.1 (default 5673)
  --dist-port PORT   Erlang distribution port (default PORT+20000)
  --mgmt-port PORT   also serve the management HTTP API on 127.0.0.1:PORT
  --conf FILE        lines appended to the node's rabbitmq.conf (TLS listeners, cluster settings)

Root: \${AVOCADO_RABBITMQ4_ROOT:-/var/cache/spicy-avocado/rabbitmq4}
USAGE
}

RABBIT4_ROOT="${AVOCADO_RABBITMQ4_ROOT:-/var/cache/spicy-avocado/rabbitmq4}"
SUITE=trixie
# The folder, inside the node's root, that holds every node's data and the shared cookie.
NODES=/var/lib/avocado-rabbitmq

build_root() {
  debootstrap_root "$RABBIT4_ROOT" "$SUITE" rabbitmq-server
}

mount_root() {
  local what
  for what in proc dev; do
    mountpoint -q "$RABBIT4_ROOT/$what" || as_root mount --bind "/$what" "$RABBIT4_ROOT/$what" \
      || die "could not bind /$what into $RABBIT4_ROOT"
  done
}

VERSION=4
NAME=
PORT=5673
DIST_PORT=
MGMT_PORT=
CONF=
ACTION="${1:-}"
[ $# -eq 0 ] || shift
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --v3) VERSION=3 ;;
    --name) NAME="${2:?--name needs a name}"; shift ;;
    --port) PORT="${2:?--port needs a port}"; shift ;;
    --dist-port) DIST_PORT="${2:?--dist-port needs a port}"; shift ;;
    --mgmt-port) MGMT_PORT="${2:?--mgmt-port needs a port}"; shift ;;
    --conf) CONF="${2:?--conf needs a file}"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[ -n "$NAME" ] || NAME="avocado$VERSION"
[ -n "$DIST_PORT" ] || DIST_PORT=$((PORT + 20000))
NODE="$NAME@localhost"

if [ "$VERSION" = 4 ]; then
  HOST_NODES="$RABBIT4_ROOT$NODES"
  IN_ROOT=(chroot "$RABBIT4_ROOT")
else
  HOST_NODES="$NODES"
  IN_ROOT=()
fi
DATA="$NODES/$NAME"
HOST_DATA="$HOST_NODES/$NAME"

# A command of the node's RabbitMQ, in its root, with the shared cookie and nothing of ours.
in_node() {
  as_root "${IN_ROOT[@]}" /usr/bin/env -i HOME="$NODES" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 LC_ALL=C.UTF-8 "$@"
}

ctl() { in_node /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$NODE" "$@"; }

running() {
  local pid
  [ -f "$HOST_DATA/pid" ] && pid=$(cat "$HOST_DATA/pid" 2>/dev/null) && [ -n "$pid" ] \
    && alive "$pid"
}

write_conf() {
  as_root mkdir -p "$HOST_DATA/log"
  {
    echo "listeners.tcp.default = 127.0.0.1:$PORT"
    echo "log.file.level = info"
    if [ -n "$MGMT_PORT" ]; then
      echo "management.tcp.port = $MGMT_PORT"
      echo "management.tcp.ip = 127.0.0.1"
    fi
    [ -z "$CONF" ] || cat "$CONF"
  } | as_root tee "$HOST_DATA/rabbitmq.conf" >/dev/null
  if [ -n "$MGMT_PORT" ]; then echo "[rabbitmq_management]."; else echo "[]."; fi \
    | as_root tee "$HOST_DATA/enabled_plugins" >/dev/null
}

start_node() {
  if [ "$VERSION" = 4 ]; then build_root; mount_root
  else command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
  fi
  if running; then wait_port 127.0.0.1 "$PORT" 60 "RabbitMQ node $NODE"; return 0; fi
  port_open 127.0.0.1 "$PORT" && die "port $PORT is taken by something other than node $NODE"
  write_conf
  # setsid: the node outlives this script and a test's process group.
  in_node RABBITMQ_NODENAME="$NODE" RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_BASE="$DATA" RABBITMQ_MNESIA_BASE="$DATA/mnesia" RABBITMQ_LOG_BASE="$DATA/log" \
    RABBITMQ_CONFIG_FILE="$DATA/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$DATA/enabled_plugins" \
    RABBITMQ_PID_FILE="$DATA/pid" RABBITMQ_ADVANCED_CONFIG_FILE="$DATA/advanced.config" \
    ERL_CRASH_DUMP="$DATA/log/erl_crash.dump" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server >>"$HOST_DATA/log/console.log" 2>&1 </dev/null &
  local i
  for ((i = 0; i < 900; i++)); do
    port_open 127.0.0.1 "$PORT" && return 0
    if [ "$i" -gt 50 ] && ! running; then
      tail -n 30 "$HOST_DATA/log/console.log" >&2
      die "RabbitMQ node $NODE exited while starting (log: $HOST_DATA/log)"
    fi
    sleep 0.1
  done
  die "RabbitMQ node $NODE did not serve AMQP on 127.0.0.1:$PORT within 90 s (log: $HOST_DATA/log)"
}

stop_node() {
  running || return 0
  local pid
  pid=$(cat "$HOST_DATA/pid")
  ctl stop >/dev/null 2>&1 || true
  await_exit "$pid" 300 || { as_root kill -KILL "$pid"; await_exit "$pid" 100; }
}

kill_node() {
  running || return 0
  local pid
  pid=$(cat "$HOST_DATA/pid")
  as_root kill -KILL "$pid"
  await_exit "$pid" 100 || die "node $NODE survived SIGKILL"
}

case "$ACTION" in
  build) build_root ;;
  start) start_node ;;
  stop) stop_node ;;
  kill) kill_node ;;
  wipe) kill_node; as_root rm -rf "$HOST_DATA" ;;
  dir) printf '%s\n' "$HOST_DATA" ;;
  ctl) ctl "${EXTRA[@]}" ;;
  queues) in_node /usr/lib/rabbitmq/bin/rabbitmq-queues -q -n "$NODE" "${EXTRA[@]}" ;;
  diagnostics) in_node /usr/lib/rabbitmq/bin/rabbitmq-diagnostics -q -n "$NODE" "${EXTRA[@]}" ;;
  -h | --help | "") usage ;;
  *) usage >&2; die "unknown action: $ACTION" ;;
esac
