#!/usr/bin/env bash
# Why this file exists: the entry point of `make bench-peers`, the benchmark of xpand against the
# Python stacks a team would pick instead (bare ONNX Runtime, Celery, Ray Serve). It prepares
# what bench.py needs and guarantees the clean-up:
#   1. a private venv in loadtests/peers/.venv with the pinned requirements.txt, from PyPI only
#      (reinstalled when requirements.txt changes);
#   2. the network guard, sitecustomize.py, copied into that venv's site-packages so every
#      Python process of the benchmark refuses non-loopback traffic;
#   3. bench.py, with an exit trap that runs `bench.py --cleanup` on whatever it recorded
#      (Ray, Celery, xpand, the private Mosquitto, the database, Redis DB 15), also on Ctrl-C.
# Settings come from the environment: DURATION (s, default 20), ROUNDS (1), CLIENTS ("1,16"),
# WARMUP (s, 3), STACKS ("bare,celery,ray,ray-batch,xpand"), CARGO_TARGET_DIR.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
venv="$here/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "bench-peers: installing the peer stacks into $venv (PyPI; the first time takes a while)" >&2
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    # pip is the one process of this venv that may reach outside (PyPI): take the guard out
    # while it runs; it goes back in below, before any benchmark process starts.
    find "$venv/lib" -path '*/site-packages/sitecustomize.py' -delete
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$here/sitecustomize.py" "$site/sitecustomize.py"
# No Python process of the venv may start without the guard.
"$venv/bin/python" -c 'import socket, sys; sys.exit(0 if getattr(socket, "PEERS_NETWORK_GUARD", False) else 1)' \
    || { echo "bench-peers: the network guard did not load in $venv" >&2; exit 1; }

link="$(mktemp /tmp/xpand-peers-state.XXXXXX)"
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local state
    state="$(cat "$link" 2>/dev/null || true)"
    if [[ -n "$state" && -f "$state" ]]; then
        "$venv/bin/python" "$here/bench.py" --cleanup "$state" || true
    fi
    rm -f "$link"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export RAY_USAGE_STATS_ENABLED=0
export PEERS_STATE_LINK="$link"
export PEERS_COMMAND="${PEERS_COMMAND:-loadtests/peers/run.sh}"
"$venv/bin/python" "$here/bench.py"
