#!/usr/bin/env bash
# The Debian packages the test suites need beyond Python, PostgreSQL and RabbitMQ.
# `make test` and `.ci/run` both call this: as root it installs what is missing; as anyone
# else it names what is missing in one line and carries on (the suites that need a
# missing package skip and say which).
#   prometheus      promtool + prometheus for tests/deploy (the monitoring configuration)
#   docker.io       dockerd 20.10 + CLI for tests/compose (its own daemon, never the host's)
#   docker-compose  the v1 CLI (1.29) that tests/compose drives
#   debootstrap     the Debian base image tests/compose builds its stand-in images on
#   npm             the AsyncAPI parser `make test` installs (tests/asyncapi), and the
#                   Compose schema tests/deploy fetches
set -euo pipefail

packages=(prometheus docker.io docker-compose debootstrap npm)
# One command each package provides, to tell whether it is there without asking dpkg.
declare -A provides=(
    [prometheus]=/usr/bin/promtool
    [docker.io]=/usr/sbin/dockerd
    [docker-compose]=/usr/bin/docker-compose
    [debootstrap]=/usr/sbin/debootstrap
    [npm]=/usr/bin/npm
)

missing=()
for p in "${packages[@]}"; do
    [ -x "${provides[$p]}" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-packages: missing ${missing[*]}; install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 0
fi

# Each package would start its own daemon (prometheus on :9090, dockerd and containerd on
# the default socket) unless policy-rc.d forbids it; the tests start their own daemons, so
# forbid starting any during the install.
added_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    added_policy=1
fi
trap '[ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
echo "system-packages: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Should an existing policy have let a daemon start anyway, stop just that one by its pid file.
if [ -s /run/prometheus/prometheus.pid ]; then
    start-stop-daemon --stop --quiet --oknodo --retry=TERM/30/KILL/5 \
        --pidfile /run/prometheus/prometheus.pid --exec /usr/bin/prometheus
fi
