#!/usr/bin/env bash
# Installs schemathesis from PyPI into ~/.cache/xpand/schemathesis-venv, for the security suite
# that fuzzes every operation of the served OpenAPI document (tests/it/fuzz_api.rs). Quiet when
# already installed.
set -euo pipefail

version=4.32.5
venv="${XPAND_SCHEMATHESIS_VENV:-$HOME/.cache/xpand/schemathesis-venv}"
if [[ -x "$venv/bin/schemathesis" ]] && "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
    exit 0
fi
echo "setup-schemathesis: installing schemathesis==$version into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version" >&2
