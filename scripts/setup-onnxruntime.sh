#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that xpand workers load at run time (`ort` with
# `load-dynamic`), taken from the official PyPI wheel, and prints the library's full path.
#
#   scripts/setup-onnxruntime.sh            # CPU build (the `onnxruntime` wheel)
#   ORT_VERSION=1.31.1 scripts/setup-onnxruntime.sh
#
# Idempotent: when the library is already in place it only prints its path. Point a worker at
# another build (for example `onnxruntime-gpu` for CUDA) with ORT_DYLIB_PATH.
set -euo pipefail

version="${ORT_VERSION:-1.31.1}"
dest="${XPAND_ORT_DIR:-$HOME/.cache/xpand/onnxruntime-$version}"
lib="$dest/libonnxruntime.so.$version"

if [[ -s "$lib" ]]; then
    echo "$lib"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64 | Linux-aarch64) ;;
    *) echo "setup-onnxruntime: only Linux x86_64/aarch64 wheels are handled here" >&2; exit 1 ;;
esac

python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$lib.partial"' EXIT

echo "setup-onnxruntime: downloading onnxruntime==$version from PyPI" >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    "onnxruntime==$version" -d "$tmp" >&2

wheel="$(find "$tmp" -maxdepth 1 -name 'onnxruntime-*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "setup-onnxruntime: pip did not produce an onnxruntime wheel" >&2
    exit 1
fi

mkdir -p "$dest"
# Extract to a temporary name and rename, so an interrupted run never leaves a truncated library
# that the quick check above would accept.
"$python" - "$wheel" "$lib.partial" <<'PY'
import re
import shutil
import sys
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if re.fullmatch(r"onnxruntime/capi/libonnxruntime\.so(\.[0-9.]+)?", n)]
    if not names:
        sys.exit("setup-onnxruntime: the wheel holds no onnxruntime/capi/libonnxruntime.so*")
    # Prefer the versioned file: in wheels the unversioned name, when present, is the same library.
    name = max(names, key=len)
    with zf.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod 0755 "$lib.partial"
mv -f "$lib.partial" "$lib"

echo "$lib"
