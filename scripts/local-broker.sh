#!/usr/bin/env bash
# Starts xpand's own Mosquitto (deploy/mosquitto/mosquitto.conf, 127.0.0.1:1884) unless it is
# already listening. The machine's Mosquitto on 1883 keeps Nagle on; ours turns it off.
set -euo pipefail
cd "$(dirname "$0")/.."
(exec 3<>/dev/tcp/127.0.0.1/1884) 2>/dev/null && exit 0
mosquitto -d -c deploy/mosquitto/mosquitto.conf
for _ in $(seq 1 40); do
    (exec 3<>/dev/tcp/127.0.0.1/1884) 2>/dev/null && exit 0
    sleep 0.25
done
echo "local-broker: mosquitto did not come up on 127.0.0.1:1884" >&2
exit 1
