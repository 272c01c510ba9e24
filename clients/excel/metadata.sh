#!/usr/bin/env bash
# Why this file exists: functions.json (the custom functions' metadata Excel reads) is generated
# from the JSDoc of src/functions.js by the npm package custom-functions-metadata, and that
# package depends on office-addin-usage-data, Microsoft's telemetry library for its CLI tools.
# This script is the one way the generator runs here, with telemetry off twice over:
#   1. the installed office-addin-usage-data must be the version package-lock.json pins (2.1.1),
#      whose reporting functions are all no-ops, with no Application Insights SDK installed
#      beside it; and HOME is a fresh folder holding the opt-out file older versions read
#      (~/office-addin-usage-data.json, usageDataLevel "off"), so no real HOME is read or written;
#   2. it runs in a network namespace of its own with only the loopback interface, down
#      (`unshare --user --map-root-user --net`): nothing can leave the machine whatever the
#      code tries. Without unshare the script refuses to run the generator.
#
#   clients/excel/metadata.sh --check   regenerate into a temporary file; fail if functions.json differs
#   clients/excel/metadata.sh --write   regenerate functions.json (after changing the JSDoc)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mode="${1:---check}"
[[ "$mode" == --check || "$mode" == --write ]] || { echo "usage: $0 --check|--write" >&2; exit 2; }
cd "$here"
[[ -d node_modules/custom-functions-metadata ]] || {
    echo "metadata: clients/excel has no node_modules: run scripts/setup-excel-addin.sh" >&2; exit 1; }

# 1. The telemetry library is the pinned no-op one, and nothing that could send is installed.
pinned="$(node -e 'const l=require("./package-lock.json");process.stdout.write(l.packages["node_modules/office-addin-usage-data"].version)')"
installed="$(node -p 'require("./node_modules/office-addin-usage-data/package.json").version')"
if [[ "$pinned" != 2.1.1 || "$installed" != "$pinned" ]]; then
    echo "metadata: office-addin-usage-data is $installed (lock: $pinned); only 2.1.1, whose telemetry is removed, is vetted" >&2
    exit 1
fi
if [[ -e node_modules/applicationinsights ]]; then
    echo "metadata: node_modules/applicationinsights is installed: refusing to run the generator" >&2
    exit 1
fi

home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
printf '{"usageDataInstances":{"office-addin-usage-data":{"usageDataLevel":"off"},"custom-functions-metadata":{"usageDataLevel":"off"}}}\n' \
    > "$home/office-addin-usage-data.json"

# 2. Loopback only: a private network namespace; the check inside proves it has no other interface.
command -v unshare >/dev/null || { echo "metadata: unshare (util-linux) is missing: no network guard, no generator" >&2; exit 1; }
out="$home/functions.json"
unshare --user --map-root-user --net env -i PATH="$PATH" HOME="$home" \
    bash -c '
        ifaces="$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")"
        [[ "$ifaces" == "lo " ]] || { echo "metadata: the namespace has interfaces: $ifaces" >&2; exit 1; }
        node node_modules/custom-functions-metadata/cli.js generate src/functions.js "$1"
    ' generate "$out"
[[ -s "$out" ]] || { echo "metadata: the generator wrote nothing (see its errors above)" >&2; exit 1; }

if [[ "$mode" == --write ]]; then
    cp "$out" functions.json
elif ! diff -u functions.json "$out" >&2; then
    echo "metadata: clients/excel/functions.json is stale against src/functions.js: run clients/excel/metadata.sh --write" >&2
    exit 1
fi
