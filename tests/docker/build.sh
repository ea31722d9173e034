#!/usr/bin/env bash
# Stand-ins for the official images the stack names (RabbitMQ, Redis, PostgreSQL and the Python
# base of the project's Dockerfiles), for a machine that cannot pull from Docker Hub: one Debian
# 13 root made with debootstrap, loaded with `docker import`, and a thin image per service that
# behaves as the official one does where the compose files rely on it. Test harness only.
#
# Prints the variables that point the compose files at them (RABBITMQ_IMAGE=... and so on).
# Cached: the root under /var/cache/spicy-avocado/docker-standins, the images in the engine,
# tagged with a hash of this folder, so a changed recipe makes new ones.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/lib.sh
source "$HERE/../../scripts/lib.sh"

CACHE="${AVOCADO_STANDIN_CACHE:-/var/cache/spicy-avocado/docker-standins}"
PACKAGES=ca-certificates,python3,python3-venv,rabbitmq-server,redis-server,postgresql-17
# The variable that names each official image in the compose files, and its stand-in.
declare -A VARIABLES=([python]=PYTHON_IMAGE [rabbitmq]=RABBITMQ_IMAGE [redis]=REDIS_IMAGE
  [postgres]=POSTGRES_IMAGE)

# The root and its import follow the packages and this script; each stand-in, the whole folder.
ROOT_DIR="$CACHE/trixie-$(echo "$PACKAGES" | sha256sum | cut -c1-12)"
BASE="avocado-standin-base:$(cat "$0" | sha256sum | cut -c1-12)"
TAG=$(cat "$HERE"/* | sha256sum | cut -c1-12)

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

build_all() {
  ensure_docker_engine
  local service missing=0
  for service in "${!VARIABLES[@]}"; do have_image "avocado-standin-$service:$TAG" || missing=1; done
  [ "$missing" = 1 ] || return 0
  if ! have_image "$BASE"; then
    debootstrap_root "$ROOT_DIR" trixie "$PACKAGES"
    # The machine's trust store: pip in the builds reaches PyPI through whatever proxy the
    # machine itself trusts.
    as_root cp /etc/ssl/certs/ca-certificates.crt "$ROOT_DIR/etc/ssl/certs/ca-certificates.crt"
    say "loading the Debian root into the engine as $BASE"
    as_root tar -C "$ROOT_DIR" --one-file-system --numeric-owner \
      --exclude=./proc/* --exclude=./dev/* --exclude=./.avocado-ready \
      --exclude=./var/cache/apt/archives/*.deb --exclude=./var/lib/apt/lists/* -c . \
      | docker import --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null \
      || die "docker import of $ROOT_DIR failed"
  fi
  # Those of earlier recipes go.
  docker images --format '{{.Repository}}:{{.Tag}}' 'avocado-standin-*' \
    | grep -v -e ":$TAG\$" -e "^$BASE\$" | xargs -r docker rmi >/dev/null 2>&1 || true
  for service in "${!VARIABLES[@]}"; do
    have_image "avocado-standin-$service:$TAG" && continue
    say "building the $service stand-in"
    docker build -q --build-arg "BASE=$BASE" -f "$HERE/Dockerfile.$service" \
      -t "avocado-standin-$service:$TAG" "$HERE" >"$CACHE/build-$service.log" 2>&1 \
      || { cat "$CACHE/build-$service.log" >&2; die "building the $service stand-in failed"; }
  done
}

as_root mkdir -p "$CACHE"
# One build at a time on a machine; whoever waited finds the images made.
exec 8>"$CACHE/build.lock"
flock 8
build_all >&2
flock -u 8
for service in "${!VARIABLES[@]}"; do
  printf '%s=avocado-standin-%s:%s\n' "${VARIABLES[$service]}" "$service" "$TAG"
done
