#!/usr/bin/env bash
# Installs what tests/it/generated_clients.rs generates clients with, as their users would get
# them: openapi-python-client, ruff and mypy from PyPI into ~/.cache/xpand/generated-venv (pinned
# in tests/generated/requirements.txt), and openapi-typescript, openapi-fetch and typescript
# from npm into tests/generated/node_modules (pinned in its package-lock.json). Quiet when
# already installed.
#
#   scripts/setup-generated-clients.sh
set -euo pipefail

dir="$(cd "$(dirname "$0")/.." && pwd)/tests/generated"
venv="${XPAND_GENERATED_VENV:-$HOME/.cache/xpand/generated-venv}"
stamp="$venv/.installed"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    rm -f "$stamp"
fi
if [[ ! -f $stamp ]] || [[ "$dir/requirements.txt" -nt $stamp ]]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$dir/requirements.txt"
    touch "$stamp"
fi
cd "$dir"
if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules ]]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
