#!/usr/bin/env bash
# Creates clients/python/.venv with the Python SDK installed editable (with its pandas extra)
# and the tools pinned in clients/python/requirements-dev.txt, all from PyPI, then checks the
# package and its tests: `ruff check`, `ruff format --check`, `mypy --strict`; silent on success,
# reinstalls only when the pins or pyproject.toml change. tests/it/python_sdk.rs runs the SDK's
# pytest suite with this venv against a real gateway.
#
#   scripts/setup-python-sdk.sh
set -euo pipefail

dir="$(cd "$(dirname "$0")/.." && pwd)/clients/python"
cd "$dir"
stamp=.venv/.installed
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
    rm -f "$stamp"
fi
if [[ ! -f $stamp ]] || [[ requirements-dev.txt -nt $stamp ]] || [[ pyproject.toml -nt $stamp ]]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -r requirements-dev.txt -e '.[pandas]'
    touch "$stamp"
fi
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
if ! out="$(.venv/bin/mypy --strict 2>&1)"; then
    echo "$out" >&2
    echo "setup-python-sdk: clients/python does not pass mypy --strict" >&2
    exit 1
fi
