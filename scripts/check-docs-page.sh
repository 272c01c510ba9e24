#!/usr/bin/env bash
# Renders the docs page in headless Chromium and checks that operations and schemas appear,
# that no error box was rendered, that the page has no external URLs and that the browser
# reported no Content-Security-Policy violation.
#
#   scripts/check-docs-page.sh [screenshot.png]
#       src/http/docs.html against openapi/openapi.json, from a plain local server (no CSP);
#   XPAND_URL=http://127.0.0.1:8080 scripts/check-docs-page.sh [screenshot.png]
#       a running gateway's /docs and /openapi.json, with the headers (CSP) it serves.
#
# Needs python3 and chromium (apt-get install -y chromium).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
chrome="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$chrome" ] || { echo "chromium not found" >&2; exit 2; }

if grep -q 'https://' "$root/src/http/docs.html"; then
  echo "FAIL: docs.html contains an external https:// URL" >&2; exit 1
fi

tmp="$(mktemp -d)"
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
if [ -n "${XPAND_URL:-}" ]; then
  url="${XPAND_URL%/}/docs"
  python3 -c "import sys, urllib.request; open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1]).read())" \
    "${XPAND_URL%/}/openapi.json" "$tmp/openapi.json"
else
  cp "$root/src/http/docs.html" "$tmp/docs.html"
  cp "$root/openapi/openapi.json" "$tmp/openapi.json"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$tmp" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/openapi.json')" 2>/dev/null && break; sleep 0.1; done
  url="http://127.0.0.1:$port/docs.html"
fi

flags=(--headless --no-sandbox --disable-gpu --virtual-time-budget=5000)
# The page's console goes to stderr with --enable-logging: a CSP violation is reported there.
"$chrome" "${flags[@]}" --enable-logging=stderr --v=0 --dump-dom "$url" 2> "$tmp/console.log" > "$tmp/dom.html"
if grep -i 'Content Security Policy' "$tmp/console.log" >&2; then
  echo "FAIL: the browser reported a Content-Security-Policy violation" >&2; exit 1
fi
if [ $# -ge 1 ]; then
  "$chrome" "${flags[@]}" --screenshot="$1" --window-size=1400,2000 "$url" >/dev/null 2>&1
fi

# Check the rendered DOM (scripts stripped, so the page's own source cannot satisfy a check):
# every path, operation and schema anchor must show up, and no error box.
python3 - "$tmp/openapi.json" "$tmp/dom.html" <<'PY'
import json, re, sys
spec = json.load(open(sys.argv[1]))
dom = re.sub(r"<script.*?</script>", "", open(sys.argv[2]).read(), flags=re.S)
methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
slug = lambda s: re.sub(r"^-+|-+$", "", re.sub(r"[^a-z0-9]+", "-", s.lower()))
need = []
for path, item in spec.get("paths", {}).items():
    need.append(">" + path.replace("{", "<span class=\"pp\">{").replace("}", "}</span>") + "<")
    need += ['id="op-%s-%s"' % (m, slug(path)) for m in item if m in methods]
need += ['id="schema-%s"' % n for n in spec.get("components", {}).get("schemas", {})]
missing = [n for n in need if n not in dom]
for n in missing:
    print("FAIL: rendered page lacks " + n, file=sys.stderr)
if 'class="error"' in dom:
    print("FAIL: the page rendered an error: " + dom[dom.index('class="error"'):][:300], file=sys.stderr)
    missing.append("error")
if missing:
    sys.exit(1)
print("OK: %d operations and %d schemas rendered (%d bytes of DOM)" % (
    dom.count('class="card op"'), dom.count('class="card schema"'), len(dom)))
PY
