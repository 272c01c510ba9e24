#!/usr/bin/env bash
# Starts PostgreSQL, Redis and Mosquitto on 127.0.0.1 if they are not answering, using this
# machine kind's own start commands, and waits until each accepts connections. On a Debian
# machine that lacks one, it installs it from Debian's packages first; a PostgreSQL it installed
# is given what the project expects of it: trust for connections from the loopback only.
set -euo pipefail

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi
missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ensure-services: installing ${missing[*]} from Debian's packages" >&2
    "$(dirname "$0")/apt-install.sh" "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        # The suite connects as `postgres` from 127.0.0.1 without a password.
        for hba in /etc/postgresql/*/main/pg_hba.conf; do
            $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        done
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main \
            restart 2>/dev/null || true
    fi
fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
    local name=$1 port=$2
    for _ in $(seq 1 60); do
        listening "$port" && return 0
        sleep 0.5
    done
    echo "ensure-services: $name did not come up on 127.0.0.1:$port" >&2
    exit 1
}

if ! listening 5432; then
    echo "ensure-services: starting PostgreSQL" >&2
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
    wait_for PostgreSQL 5432
fi
if ! listening 6379; then
    echo "ensure-services: starting Redis" >&2
    $SUDO mkdir -p /var/lib/redis /var/log/redis
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis 6379
fi
if ! listening 1883; then
    echo "ensure-services: starting Mosquitto" >&2
    $SUDO mosquitto -d -c /etc/mosquitto/mosquitto.conf
    wait_for Mosquitto 1883
fi
