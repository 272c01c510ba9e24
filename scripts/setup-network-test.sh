#!/usr/bin/env bash
# What tests/it/network.rs builds its hosts with: iproute2 (namespaces, veth, bridge), iptables
# (partitions), ethtool (offloads off, so the lossy relay forwards whole frames) and openssl (the
# broker's CA). Installed from Debian's packages when missing.
set -euo pipefail

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-network-test: installing ${missing[*]} from Debian's packages" >&2
    "$(dirname "$0")/apt-install.sh" "${missing[@]}" >/dev/null
fi
