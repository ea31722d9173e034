#!/bin/sh
# The account the official image makes from RABBITMQ_DEFAULT_USER and RABBITMQ_DEFAULT_PASS,
# given to RabbitMQ in a file of conf.d (never on its command line).
set -eu
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
  umask 077
  printf 'default_user = %s\ndefault_pass = %s\n' "$RABBITMQ_DEFAULT_USER" \
    "${RABBITMQ_DEFAULT_PASS:?RABBITMQ_DEFAULT_PASS is not set}" >/etc/rabbitmq/conf.d/10-default-user.conf
fi
exec "$@"
