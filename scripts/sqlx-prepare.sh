#!/usr/bin/env bash
# Regenerates `.sqlx/`, the query descriptions the gateway's `sqlx::query!` macros check against
# when they build offline (`.cargo/config.toml` sets SQLX_OFFLINE): migrates a scratch database
# to the current schema, expands every checked query against it, then drops it.
# `--check` regenerates into a temporary directory and fails if `.sqlx/` differs (the test
# command runs this, so a changed query or migration without fresh descriptions fails the suite).
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
[[ "${1:-}" == "--check" ]] && check=true
db="xpand_sqlx_$$"
url="postgres://postgres@127.0.0.1:5432/$db"
out=.sqlx
$check && out="$(mktemp -d)"
psql() { command psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q "$@"; }
cleanup() {
    psql -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    if $check; then rm -rf "$out"; fi
}
trap cleanup EXIT

psql -d postgres -c "CREATE DATABASE $db" >/dev/null
for migration in migrations/*.sql; do
    psql -d "$db" -f "$migration" >/dev/null
done
$check || rm -f .sqlx/query-*.json
mkdir -p "$out"
# The macros only re-expand when the crate recompiles.
touch src/lib.rs
SQLX_OFFLINE=false DATABASE_URL="$url" SQLX_OFFLINE_DIR="$(realpath "$out")" \
    cargo check --quiet -p xpand --all-targets
if $check; then
    if ! diff -r -q .sqlx "$out" >/dev/null; then
        echo "sqlx-prepare: .sqlx/ is out of date with the queries or the schema;" \
            "run make sqlx-prepare and commit it" >&2
        diff -r -q .sqlx "$out" >&2 || true
        exit 1
    fi
fi
