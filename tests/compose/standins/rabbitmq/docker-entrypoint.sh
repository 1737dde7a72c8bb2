#!/usr/bin/env bash
# As the official image: the data belongs to rabbitmq, and the server runs as rabbitmq.
# RABBITMQ_DEFAULT_USER/_PASS/_VHOST are read by RabbitMQ itself (3.9 and later).
set -euo pipefail
if [[ "$1" == rabbitmq* ]] && [ "$(id -u)" = '0' ]; then
    if [ "$1" = 'rabbitmq-server' ]; then
        find /var/lib/rabbitmq \! -user rabbitmq -exec chown rabbitmq:rabbitmq '{}' +
    fi
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$BASH_SOURCE" "$@"
fi
exec "$@"
