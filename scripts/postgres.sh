#!/usr/bin/env bash
# A throwaway PostgreSQL for dialtone-credits (tests, local multi-instance runs).
#
#   scripts/postgres.sh start DIR PORT   install (Debian's postgresql) if missing, initdb DIR/pgdata,
#                                        start on 127.0.0.1:PORT (unix sockets in DIR), create database
#                                        `dialtone`, print its URL
#   scripts/postgres.sh url   DIR PORT   print the URL
#   scripts/postgres.sh stop  DIR PORT   stop the server
#
# The server listens on loopback only and trusts local connections (no
# password): it is for development and tests, never for production.
#   DIALTONE_TEST_PG_URL=$(scripts/postgres.sh start target/pg 15432) cargo test -p dialtone-credits
# PG_FSYNC=on makes commits durable (make bench measures that); tests keep
# the default fsync=off, which is faster and loses nothing they check.
set -euo pipefail

usage() { echo "usage: $0 start|stop|url DIR PORT" >&2; exit 2; }
[ $# -eq 3 ] || usage
cmd=$1; dir=$2; port=$3
case "$port" in ''|*[!0-9]*) echo "PORT must be a number" >&2; exit 2;; esac
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
data="$dir/pgdata"
log="$dir/postgres.log"
url="postgres://postgres@127.0.0.1:$port/dialtone"

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
        return 1
    fi
    echo "$d"
}

install_postgres() {
    if ! pg_bindir >/dev/null; then
        echo "postgres.sh: installing PostgreSQL (Debian package postgresql)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update >&2
        apt-get install -y postgresql >&2
    fi
}

case "$cmd" in
url)
    echo "$url"
    ;;
start)
    install_postgres
    bin=$(pg_bindir)
    if [ "$(id -u)" -eq 0 ]; then
        # initdb and the server must not run as root.
        chown postgres:postgres "$dir"
    fi
    if [ ! -s "$data/PG_VERSION" ]; then
        as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if ! as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        touch "$log"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$log"
        as_postgres "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c fsync=${PG_FSYNC:-off} ${PG_OPTS:-}" start >&2 \
            || { tail -n 30 "$log" >&2; exit 1; }
    fi
    if ! as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'dialtone'" | grep -q 1; then
        as_postgres "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres dialtone
    fi
    echo "$url"
    ;;
stop)
    if bin=$(pg_bindir) && [ -s "$data/PG_VERSION" ]; then
        if as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
            as_postgres "$bin/pg_ctl" -D "$data" -m fast -w stop >&2
        fi
    fi
    ;;
*)
    usage
    ;;
esac
