#!/usr/bin/env bash
# Installs ffmpeg and ffprobe from Debian's packages when missing (the gateway probes, cuts and
# joins videos with them; workers decode and encode segments). Quiet when there is nothing to do.
set -euo pipefail

if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
  exit 0
fi
echo "installing ffmpeg from Debian's packages" >&2
"$(dirname "$0")/apt-install.sh" ffmpeg >/dev/null
command -v ffprobe >/dev/null
