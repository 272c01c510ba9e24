#!/usr/bin/env bash
# Starts PostgreSQL, Redis and Mosquitto on 127.0.0.1 if they are not answering, using this
# machine kind's own start commands, and waits until each accepts connections.
set -euo pipefail

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
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
    wait_for PostgreSQL 5432
fi
if ! listening 6379; then
    echo "ensure-services: starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis 6379
fi
if ! listening 1883; then
    echo "ensure-services: starting Mosquitto" >&2
    mosquitto -d -c /etc/mosquitto/mosquitto.conf
    wait_for Mosquitto 1883
fi
