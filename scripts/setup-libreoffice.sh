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
    echo "setup-libreoffice: installing ${missing[*]} with apt-get" >&2
    "$(dirname "$0")/apt-install.sh" "${missing[@]}" >&2
fi

for tool in /usr/lib/libreoffice/sdk/bin/unoidl-write /usr/bin/soffice /usr/bin/unopkg; do
    [[ -x "$tool" ]] || { echo "setup-libreoffice: apt-get did not install $tool" >&2; exit 1; }
done
/usr/bin/python3 -c 'import uno' 2>/dev/null ||
    { echo "setup-libreoffice: /usr/bin/python3 cannot import uno (python3-uno)" >&2; exit 1; }
