#!/usr/bin/env bash
# Installs what tests/browser/ needs: Debian's chromium (at /usr/bin/chromium, with the codecs to
# play H.264/MP4 and VP9/WebM) and playwright-core from tests/browser/package-lock.json. No browser
# is downloaded by npm: the tests drive the system chromium.
#
#   scripts/setup-browser.sh
#   node tests/browser/anonymize.mjs http://127.0.0.1:8080 "$(cat .xpand/dev-api-key)" in.mp4 2.0
#
# Idempotent and quiet when everything is in place. Installing chromium needs root (or sudo).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"

if [[ ! -x /usr/bin/chromium ]]; then
    echo "setup-browser: installing chromium with apt-get" >&2
    "$root/scripts/apt-install.sh" chromium >&2
    [[ -x /usr/bin/chromium ]] || { echo "setup-browser: apt-get did not install /usr/bin/chromium" >&2; exit 1; }
fi

if [[ ! -f "$root/tests/browser/node_modules/playwright-core/package.json" ]]; then
    command -v npm >/dev/null || { echo "setup-browser: npm is missing (install Node.js 20+)" >&2; exit 1; }
    echo "setup-browser: installing playwright-core (npm ci)" >&2
    npm ci --prefix "$root/tests/browser" --no-audit --no-fund --loglevel=error >&2
fi
