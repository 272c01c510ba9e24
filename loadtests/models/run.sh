#!/usr/bin/env bash
# The registry and predict benchmark (docs/performance.md, "Your own models"): against a running
# gateway with its local workers (`make run` in another terminal), it measures what the registry
# check adds to an upload, a model's first job on a cold worker, and warm jobs against the bare
# model in ONNX Runtime, for the 1 KB example model and a 50 MB one it builds. A private venv
# (loadtests/models/.venv, PyPI only) with the peer benchmark's network guard: the benchmark
# reaches loopback only.
#
#   loadtests/models/run.sh            # XPAND_URL, XPAND_API_KEY (default: .xpand/dev-api-key)
#   JOBS=200 CLIENTS=8 loadtests/models/run.sh
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    find "$venv/lib" -path '*/site-packages/sitecustomize.py' -delete
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$repo/loadtests/peers/sitecustomize.py" "$site/sitecustomize.py"
export XPAND_API_KEY="${XPAND_API_KEY:-$(cat "$repo/.xpand/dev-api-key")}"
cd "$repo"
exec "$venv/bin/python" "$here/bench.py"
