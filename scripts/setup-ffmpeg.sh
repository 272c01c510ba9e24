#!/usr/bin/env bash
# Installs ffmpeg and ffprobe from Debian's packages when missing (the gateway probes, cuts and
# joins videos with them; workers decode and encode segments). Quiet when there is nothing to do.
set -euo pipefail

if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
  exit 0
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
echo "installing ffmpeg from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
command -v ffprobe >/dev/null
