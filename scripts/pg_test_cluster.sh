#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1 for the shared Optuna/MLflow store (tests, trials):
#   scripts/pg_test_cluster.sh start DIR PORT   # initdb DIR/data (first time), start; prints URLs
#   scripts/pg_test_cluster.sh stop DIR         # stop it (DIR stays; rm -rf it to throw it away)
#   scripts/pg_test_cluster.sh url DIR PORT     # the URL again
# Databases `optuna` and `mlflow`, superuser `finetune_budget`, trust authentication on
# 127.0.0.1 only: a test cluster, not a production database. As root, the server runs as the
# `postgres` user (initdb refuses root), so DIR's parents must be traversable by it (e.g. /tmp/x).
# PG_BIN overrides where initdb and pg_ctl are (default: the newest /usr/lib/postgresql/*/bin).
set -euo pipefail

usage() { echo "usage: $0 start|stop|url DIR [PORT]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2 port=${3:-55432}
user=finetune_budget

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then
    echo "error: PostgreSQL not found (no /usr/lib/postgresql/*/bin/pg_ctl); install it" \
        "(apt-get install postgresql) or set PG_BIN" >&2
    exit 3
fi

as_server() {  # run a server binary as a non-root user
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_server "$PG_BIN/initdb" -D "$dir/data" -U "$user" --auth=trust -E UTF8 --no-instructions \
            >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    # listen on 127.0.0.1 only; the Unix socket goes into DIR (no /var/run/postgresql needed)
    if ! as_server "$PG_BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_server "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >/dev/null \
            || { tail -n 20 "$dir/server.log" >&2; exit 1; }
    fi
    for db in optuna mlflow; do
        if ! "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U "$user" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
            "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U "$user" "$db"
        fi
    done
    echo "postgresql://$user@127.0.0.1:$port/{optuna,mlflow}"
    ;;
stop)
    [ -f "$dir/data/postmaster.pid" ] || { echo "no server running in $dir"; exit 0; }
    as_server "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    echo "stopped $dir"
    ;;
url)
    echo "postgresql://$user@127.0.0.1:$port/{optuna,mlflow}"
    ;;
*) usage ;;
esac
