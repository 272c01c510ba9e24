#!/usr/bin/env bash
# Brings deploy/compose.yaml up with podman-compose on this machine and checks it the way an
# operator would: a funded account, a forecast job through the load balancer, answered. Then it
# measures throughput through the load balancer with both gateway replicas and with one
# (xpand-loadtest, `Prefer: wait`, DURATION seconds each, default 20), and takes everything down,
# volumes included, even when it fails. As root; `make compose-test` runs it.
#
# The xpand images come from `make images`. No image registry is reachable here, so the
# upstream service images are replaced by stand-ins from Debian's packages
# (deploy/compose/local.yaml). This machine has no systemd to run podman's health checks on a
# timer, so this script runs them every two seconds while the stack is up.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=$PWD/deploy/images/containers.conf
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/xpand/target}
target=$CARGO_TARGET_DIR
duration=${DURATION:-20}
project=xpand-compose-test

venv=$HOME/.cache/xpand/compose-venv
if [ ! -x "$venv/bin/podman-compose" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'podman-compose==1.6.0'
fi
podman image exists localhost/xpand-gateway:latest || scripts/build-images.sh
# The build fetches from Debian and PyPI trusting what this machine trusts (a proxy's CA, say).
podman image exists localhost/xpand-services:latest ||
    podman build --quiet --network host \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        -t localhost/xpand-services:latest -f deploy/compose/services.Containerfile \
        deploy/compose >/dev/null
cargo build -q --release -p xpand-loadtest

# For the measurement only: the per-key rate limit would cap it.
unlimited=$(mktemp --suffix=.yaml)
printf 'services:\n  gateway-1: {environment: {XPAND_RATE_LIMIT: "1000000"}}\n  gateway-2: {environment: {XPAND_RATE_LIMIT: "1000000"}}\n' \
    >"$unlimited"
compose=("$venv/bin/podman-compose" -p "$project" -f deploy/compose.yaml \
    -f deploy/compose/local.yaml -f "$unlimited")
checker=
cleanup() {
    [ -n "$checker" ] && kill "$checker" 2>/dev/null
    "${compose[@]}" down -v -t 5 >/dev/null 2>&1 || true
    rm -f "$unlimited"
}
trap cleanup EXIT
(
    while :; do
        for c in $(podman ps -q --filter "label=com.docker.compose.project=$project"); do
            podman healthcheck run "$c" >/dev/null 2>&1 || true
        done
        sleep 2
    done
) &
checker=$!

# podman 4.3 cannot wait on a dependency's health or exit, so the stack comes up in the
# order compose.yaml's depends_on conditions give, each stage awaited here.
container() { echo "${project}_$1_1"; }
up() { "${compose[@]}" up -d --no-deps "$@" >/dev/null 2>&1; }
healthy() { # service...
    for service in "$@"; do
        for _ in $(seq 1 90); do
            [ "$(podman inspect -f '{{.State.Health.Status}}' "$(container "$service")" 2>/dev/null)" = healthy ] &&
                continue 2
            sleep 1
        done
        echo "compose-test: $service never became healthy" >&2
        podman logs "$(container "$service")" 2>&1 | tail -20 >&2
        exit 1
    done
}
completed() { # service...
    for service in "$@"; do
        code=$(timeout 120 podman wait "$(container "$service")") || code=timeout
        [ "$code" = 0 ] && continue
        echo "compose-test: $service ended with $code" >&2
        podman logs "$(container "$service")" 2>&1 | tail -20 >&2
        exit 1
    done
}
up postgres redis emqx minio
healthy postgres redis emqx minio
up bucket migrate keys worker-keys
completed bucket migrate keys worker-keys
up register
completed register
up gateway-1 gateway-2 worker-1 worker-2
healthy gateway-1 gateway-2
up lb

api=http://127.0.0.1:8080
for _ in $(seq 1 60); do
    curl -fsS -o /dev/null "$api/readyz" 2>/dev/null && break
    sleep 1
done
curl -fsS -o /dev/null "$api/readyz" || {
    echo "compose-test: the load balancer never answered ready" >&2
    podman logs "$(container lb)" 2>&1 | tail -20 >&2
    exit 1
}

created=$("${compose[@]}" exec -T gateway-1 xpand admin create-account --name compose \
    --credit 100000000000)
key=$(echo "$created" | awk '/^api key/ {print $3}')
job=$(curl -fsS -H "Authorization: Bearer $key" -H 'Prefer: wait=30' \
    -H 'Content-Type: application/json' \
    -d '{"kind":"forecast","input":{"series":[[1,2,3,4,5,6,7,8]]},"params":{"horizon":3},"max_fee":100000}' \
    "$api/v1/jobs")
python3 - "$job" <<'PY'
import json, sys
job = json.loads(sys.argv[1])
assert job["status"] == "succeeded", job
forecast = job["output"]["forecasts"][0]
# The series climbs by one a step: the model's forecast goes on climbing from about 8.
assert len(forecast) == 3 and 7 < forecast[0] < forecast[1] < forecast[2] < 14, job
print(f"compose-test: a forecast job through the load balancer: {forecast}")
PY

measure() { # label
    local out
    out=$(XPAND_API_KEY=$key "$target/release/xpand-loadtest" --mode rest --follow wait \
        --url "$api" -c 16 -d "$duration" -n 1000000 --json 2>/dev/null)
    python3 - "$1" "$out" <<'PY'
import json, sys
label, out = sys.argv[1], json.loads(sys.argv[2])
lat = out["latency_ms"]
print(f"compose-test: {label}: {out['jobs_per_second']:.1f} jobs/s, p50 {lat['p50']:.0f} ms, "
      f"p99 {lat['p99']:.0f} ms, {out['jobs_ok']} ok, "
      f"{out['jobs_failed'] + out['jobs_errored'] + out['jobs_rejected']} not")
assert out["jobs_ok"] > 0 and out["jobs_failed"] + out["jobs_errored"] + out["jobs_rejected"] == 0
PY
}
measure "two gateway replicas"
"${compose[@]}" stop gateway-2 >/dev/null 2>&1
sleep 3
measure "one gateway replica"
