#!/usr/bin/env bash
# Installs Debian packages for the other setup scripts: as root, or through sudo. The package
# lists are refreshed only when needed: apt does not know a package yet (a fresh image has no
# lists), or installing from the lists it has fails (stale lists, a version gone).
#
#   scripts/apt-install.sh PACKAGE...
set -euo pipefail

[ "$#" -gt 0 ] || exit 0
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "apt-install: installing $* needs root" >&2; exit 1; }
    sudo=(sudo)
fi
install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@"
}
if ! apt-cache show "$@" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
    install "$@"
elif ! install "$@"; then
    "${sudo[@]}" apt-get update -qq
    install "$@"
fi
