#!/usr/bin/env bash
# `make images`: builds xpand's container images with podman from this checkout, with no image
# registry: the base from Debian's packages (scripts/make-base-image.sh), the binaries with
# cargo on this machine, staged with the ONNX Runtime library and the models into a build
# context outside the repository. CUDA=1 also builds the CUDA worker (its libraries come from
# PyPI at build time; it needs a GPU to run). Prints each image's size.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/xpand/target}
target=$CARGO_TARGET_DIR
# crun, podman's default runtime, fails in some sandboxes on rlimits; runc works everywhere.
podman=(podman --runtime "${PODMAN_RUNTIME:-runc}")
scripts/make-base-image.sh
cargo build --release -p xpand -p xpand-worker --bins
scripts/setup-models.sh
ort=$(scripts/setup-onnxruntime.sh)
context=$(mktemp -d /var/tmp/xpand-images.XXXXXX)
trap 'rm -rf "$context"' EXIT
cp "$target/release/xpand" "$target/release/xpand-worker" "$context/"
cp "$ort" "$context/libonnxruntime.so"
mkdir "$context/models"
for model in workers/models/*/; do
    name=$(basename "$model")
    mkdir "$context/models/$name"
    # A model directory is its manifest and the files it names, no test data.
    cp "$model"manifest.json "$model"*.onnx "$context/models/$name/"
done
build() { # image containerfile
    "${podman[@]}" build --quiet --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
        -t "$1" -f "deploy/images/$2" "$context" >/dev/null
    echo "images: $1 $("${podman[@]}" image inspect --format '{{.Size}}' "$1" \
        | awk '{printf "%.0f MB", $1 / 1e6}')" >&2
}
build localhost/xpand-gateway:latest gateway.Containerfile
build localhost/xpand-worker:latest worker.Containerfile
if [ -n "${CUDA:-}" ]; then
    build localhost/xpand-worker-cuda:latest worker-cuda.Containerfile
fi
