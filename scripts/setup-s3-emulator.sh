#!/usr/bin/env bash
# Installs moto's S3-compatible server from PyPI into ~/.cache/xpand/moto-venv, for the test that
# runs the gateway on an S3 object store (XPAND_FILES_URL). Quiet when already installed.
set -euo pipefail

venv="${XPAND_MOTO_VENV:-$HOME/.cache/xpand/moto-venv}"
if [[ -x "$venv/bin/moto_server" ]]; then
    exit 0
fi
echo "setup-s3-emulator: installing moto[server]==5.2.5 into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.2.5' >&2
