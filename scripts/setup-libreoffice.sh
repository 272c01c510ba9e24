#!/usr/bin/env bash
# Installs what clients/calc/ needs from Debian: libreoffice-dev (unoidl-write and the base type
# libraries, to compile the add-in's UNO type library), libreoffice-calc to run it, and
# python3-uno (the Python script provider, and the bridge tests/calc/drive.py drives Calc with).
#
#   scripts/setup-libreoffice.sh
#   make clients        # builds clients/calc/xpand.oxt
#
# Idempotent and quiet when everything is in place. Installing needs root (or sudo).
set -euo pipefail

packages=(libreoffice-dev libreoffice-calc python3-uno libreoffice-script-provider-python)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "setup-libreoffice: ${missing[*]} missing and installing needs root" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "setup-libreoffice: installing ${missing[*]} with apt-get" >&2
    install() {
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    }
    # Refresh the package lists only when needed: apt does not know a package yet (a fresh image
    # has no lists), or installing from the lists we have fails (stale lists, a version gone).
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -qq >&2
        install
    elif ! install; then
        "${sudo[@]}" apt-get update -qq >&2
        install
    fi
fi

for tool in /usr/lib/libreoffice/sdk/bin/unoidl-write /usr/bin/soffice /usr/bin/unopkg; do
    [[ -x "$tool" ]] || { echo "setup-libreoffice: apt-get did not install $tool" >&2; exit 1; }
done
/usr/bin/python3 -c 'import uno' 2>/dev/null ||
    { echo "setup-libreoffice: /usr/bin/python3 cannot import uno (python3-uno)" >&2; exit 1; }
