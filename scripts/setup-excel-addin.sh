#!/usr/bin/env bash
# Why this file exists: the Excel add-in (clients/excel) needs its npm tools installed
# (esbuild, custom-functions-metadata and the typescript it parses with, pinned in its
# package-lock.json) before it can be checked and built. This installs them, checks that the
# committed functions.json is what the JSDoc of src/functions.js generates (the generator runs
# with telemetry off and loopback only: clients/excel/metadata.sh), and bundles dist/. `make
# clients` runs it, and so `make test`, whose tests/it/excel.rs runs the bundle in Chromium.
#
#   scripts/setup-excel-addin.sh
set -euo pipefail

dir="$(cd "$(dirname "$0")/.." && pwd)/clients/excel"
cd "$dir"
command -v npm >/dev/null || { echo "setup-excel-addin: npm is missing (install Node.js 20+)" >&2; exit 1; }
if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules ]]; then
    # No install scripts: esbuild's only checks its binary, which the pinned
    # @esbuild/<platform> package already is.
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    touch node_modules
fi
./metadata.sh --check
node build.mjs
