#!/usr/bin/env bash
# Builds the LibreOffice Calc extension clients/calc/xpand.oxt: compiles the add-in's UNO
# interface (idl/XForecast.idl) into a type library with unoidl-write (from libreoffice-dev,
# which scripts/setup-libreoffice.sh installs), then zips it with extension/.
#
#   clients/calc/build.sh            # or: make clients
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
program=/usr/lib/libreoffice/program
unoidl_write=/usr/lib/libreoffice/sdk/bin/unoidl-write
[[ -x "$unoidl_write" ]] || { echo "calc/build.sh: $unoidl_write is missing: run scripts/setup-libreoffice.sh" >&2; exit 1; }

offapi="$program/types/offapi.rdb"
[[ -f "$offapi" ]] || offapi="$program/offapi.rdb"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -r "$here/extension/." "$stage/"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
"$unoidl_write" "$program/types.rdb" "$offapi" "$here/idl/XForecast.idl" "$stage/XForecast.rdb"

rm -f "$here/xpand.oxt"
# An .oxt is a zip; Python's zipfile is always here (no zip package needed).
(cd "$stage" && python3 - "$here/xpand.oxt" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as oxt:
    for root, _, files in os.walk("."):
        for name in sorted(files):
            path = os.path.join(root, name)[2:]
            oxt.write(path, path)
PY
)
echo "built $here/xpand.oxt" >&2
