#!/usr/bin/env bash
# Validates what deploy/ holds offline, as `make test` does: yamllint for the YAML itself; the
# Kubernetes manifests under deploy/k8s/ with kubernetes-validate --strict (schemas shipped in
# the package, no cluster and no network) against the Kubernetes version named below; and
# deploy/compose.yaml and deploy/compose/local.yaml against the Compose Specification's schema
# (shipped in check-jsonschema).
# The alert rules and the dashboard under deploy/monitoring/ must name only metrics the gateway
# exports (scripts/check-monitoring.py). The tools come from PyPI into
# ~/.cache/xpand/deploy-venv. A file with a field its schema does not know must fail, so the
# check first proves that each validator refuses one.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBERNETES_VERSION=1.31.0
venv="$HOME/.cache/xpand/deploy-venv"
if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1 \
    || ! "$venv/bin/yamllint" --version >/dev/null 2>&1 \
    || ! "$venv/bin/check-jsonschema" --version >/dev/null 2>&1; then
    echo "check-deploy: installing the validators into $venv (PyPI)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        kubernetes-validate==1.37.0 yamllint==1.38.0 check-jsonschema==0.39.0
fi
validate() { "$venv/bin/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "$@"; }
compose() { "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$@"; }

bad="$(mktemp --suffix=.yaml)"
trap 'rm -f "$bad"' EXIT
printf 'apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz: []\n' > "$bad"
if validate "$bad" >/dev/null 2>&1; then
    echo "check-deploy: kubernetes-validate accepted an unknown field; it checks nothing" >&2
    exit 1
fi
printf 'services:\n  x:\n    imagez: y\n' > "$bad"
if compose "$bad" >/dev/null 2>&1; then
    echo "check-deploy: the Compose schema accepted an unknown field; it checks nothing" >&2
    exit 1
fi

"$venv/bin/yamllint" --strict -c deploy/k8s/.yamllint.yaml deploy/k8s deploy/compose.yaml \
    deploy/compose/local.yaml deploy/monitoring
compose --quiet deploy/compose.yaml deploy/compose/local.yaml
"$venv/bin/python" scripts/check-monitoring.py
manifests=()
for f in deploy/k8s/*.yaml; do
    [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
validate "${manifests[@]}"
# Everything kustomization.yaml lists exists, and every manifest but the examples and the
# secrets (made by hand) is listed.
listed=$(sed -n 's/^  - //p' deploy/k8s/kustomization.yaml)
for f in $listed; do
    [[ -f "deploy/k8s/$f" ]] || { echo "check-deploy: kustomization lists missing $f" >&2; exit 1; }
done
for f in "${manifests[@]}"; do
    name=$(basename "$f")
    case "$name" in secrets.yaml | *-example.yaml) continue ;; esac
    grep -qx "  - $name" deploy/k8s/kustomization.yaml \
        || { echo "check-deploy: $name is not in kustomization.yaml" >&2; exit 1; }
done
echo "check-deploy: ${#manifests[@]} manifests valid for Kubernetes $KUBERNETES_VERSION," \
    "deploy/compose.yaml and its local stand-ins valid for the Compose Specification" >&2
