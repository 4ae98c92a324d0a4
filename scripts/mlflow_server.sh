#!/usr/bin/env bash
# An MLflow tracking server between the jobs and a database (scripts/pg_test_cluster.sh):
#   scripts/mlflow_server.sh start DIR PORT BACKEND_URI   # e.g. postgresql://u@127.0.0.1:55432/mlflow
#   scripts/mlflow_server.sh stop DIR
# Listens on 127.0.0.1:PORT (MLFLOW_SERVER_HOST to change it), stores artifacts under
# DIR/artifacts (served through the server, so jobs on other machines need no shared disk),
# logs to DIR/server.log, waits until /health answers. Jobs then use tracking.uri=http://HOST:PORT.
# MLFLOW=path/to/mlflow (default: .venv/bin/mlflow, else mlflow on PATH), MLFLOW_SERVER_WORKERS=1.
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT BACKEND_URI | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2
root=$(cd "$(dirname "$0")/.." && pwd)
MLFLOW=${MLFLOW:-$( [ -x "$root/.venv/bin/mlflow" ] && echo "$root/.venv/bin/mlflow" || command -v mlflow )}
host=${MLFLOW_SERVER_HOST:-127.0.0.1}

case "$cmd" in
start)
    [ $# -eq 4 ] || usage
    port=$3 backend=$4
    mkdir -p "$dir/artifacts"
    dir=$(cd "$dir" && pwd)
    if [ -f "$dir/server.pid" ] && kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
        echo "already running: http://$host:$port (pid $(cat "$dir/server.pid"))"
        exit 0
    fi
    # its own session, so stop ends the server and its workers together
    setsid "$MLFLOW" server --backend-store-uri "$backend" \
        --artifacts-destination "$dir/artifacts" --serve-artifacts \
        --host "$host" --port "$port" --workers "${MLFLOW_SERVER_WORKERS:-1}" \
        >"$dir/server.log" 2>&1 </dev/null &
    echo $! >"$dir/server.pid"
    for _ in $(seq 1 240); do
        if curl -sf "http://$host:$port/health" >/dev/null; then
            echo "http://$host:$port"
            exit 0
        fi
        if ! kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
            tail -n 30 "$dir/server.log" >&2
            echo "error: the MLflow server exited (log: $dir/server.log)" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "error: the MLflow server did not answer on http://$host:$port/health in 120 s" \
        "(log: $dir/server.log)" >&2
    exit 1
    ;;
stop)
    [ -f "$dir/server.pid" ] || { echo "no server pid in $dir"; exit 0; }
    pid=$(cat "$dir/server.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$dir/server.pid"
    echo "stopped the MLflow server (pid $pid)"
    ;;
*) usage ;;
esac
