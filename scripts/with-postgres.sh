#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL on loopback (Debian's packages,
# installed if missing), and always stops it afterwards.
#   scripts/with-postgres.sh DIR PORT COMMAND...
# The command sees DIALTONE_TEST_PG_URL / DIALTONE_E2E_PG_URL (the server's
# `dialtone` database) and DIALTONE_TEST_PG_REQUIRED=1 (tests that need
# PostgreSQL fail, never skip).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 DIR PORT COMMAND..." >&2; exit 2; }
dir=$1; port=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
"$here/postgres.sh" stop "$dir" "$port" >/dev/null 2>&1 || true
rm -rf "$dir/pgdata"
url=$("$here/postgres.sh" start "$dir" "$port")
trap '"$here/postgres.sh" stop "$dir" "$port" >/dev/null 2>&1 || true' EXIT
export DIALTONE_TEST_PG_URL="$url" DIALTONE_E2E_PG_URL="$url" DIALTONE_TEST_PG_REQUIRED=1
echo "PostgreSQL at $url"
"$@"
