#!/usr/bin/env bash
# Installs what clients/js needs to be checked and tested (typescript and openapi-typescript,
# pinned in its package-lock.json), then checks it: its types compile under `tsc --strict`, and
# the types generated from the committed OpenAPI document are the committed ones (a change of
# the API without `npm run types` fails here).
#
#   scripts/setup-js-client.sh
set -euo pipefail

dir="$(cd "$(dirname "$0")/.." && pwd)/clients/js"
cd "$dir"
if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules ]]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
npx --no-install tsc -p .
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
cp -r src "$fresh/src"
npx --no-install openapi-typescript ../../openapi/openapi.json -o "$fresh/src/openapi.d.ts" >/dev/null 2>&1
npx --no-install tsc -p . --noEmit false --declaration --emitDeclarationOnly --outDir "$fresh/src"
if ! diff -ru src "$fresh/src" >&2; then
    echo "setup-js-client: clients/js/src is stale against openapi/openapi.json: run 'npm run types' in clients/js" >&2
    exit 1
fi
