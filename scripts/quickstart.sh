#!/usr/bin/env bash
# The quick start: set everything up (scripts/setup.sh), start the controller and the embedded CPU
# engine, walk through a completion, compressing the prompt's KV cache, decompressing it and two more
# completions (printing each request as curl and its answer), and leave both services running for
# your own calls.
#
#   bash scripts/quickstart.sh          # set up, start, walk through
#   bash scripts/quickstart.sh stop     # stop the services
#   bash scripts/quickstart.sh status   # are they running?
#
# Logs, pid files and the bearer token (`token`, mode 0600, made once) go to .kvmesh-run/
# (KVMESH_RUN_DIR); the engine's converted model and its codec files to .kvmesh-run/cache (KVMESH_CACHE_DIR). Ports:
# KVMESH_CONTROLLER_PORT (9000), KVMESH_MONITOR_PORT (9001), KVMESH_ENGINE_PORT (8000); the agent's own
# ports come from the config (LMCACHE_CONFIG_FILE, default example.yaml) and its LMCACHE_<KEY>
# overrides. KVMESH_SKIP_SETUP=1 skips scripts/setup.sh (an environment already set up).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

RUN_DIR=${KVMESH_RUN_DIR:-$REPO/.kvmesh-run}
CONTROLLER_PORT=${KVMESH_CONTROLLER_PORT:-9000}
MONITOR_PORT=${KVMESH_MONITOR_PORT:-9001}
ENGINE_PORT=${KVMESH_ENGINE_PORT:-8000}
CONFIG=${LMCACHE_CONFIG_FILE:-$REPO/example.yaml}
START_TIMEOUT=${KVMESH_START_TIMEOUT:-600}
SERVICES="engine controller"
# Nothing outside the repository: the model's converted copy goes beside the run files.
export KVMESH_CACHE_DIR=${KVMESH_CACHE_DIR:-$REPO/.kvmesh-run/cache}

alive() {  # alive NAME: the service's pid file names a running process
  local pidfile="$RUN_DIR/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

stop_one() {
  local name=$1 pidfile="$RUN_DIR/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "quickstart: $name (pid $pid) did not stop in 20 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "quickstart: stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

stop_all() {
  for name in $SERVICES; do stop_one "$name"; done
}

status() {
  local rc=0
  for name in $SERVICES; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN_DIR/$name.pid"), log $RUN_DIR/$name.log)"
    else echo "$name: not running"; rc=1; fi
  done
  return $rc
}

fail_start() {  # fail_start NAME WHY: say why, show the log's tail, stop everything, exit 1
  echo "quickstart: FAILED: $1 $2" >&2
  echo "---- last lines of $RUN_DIR/$1.log ----" >&2
  tail -n 40 "$RUN_DIR/$1.log" >&2 || true
  echo "----" >&2
  stop_all
  exit 1
}

wait_http() {  # wait_http NAME URL: until URL answers 2xx, the process dies, or the deadline
  local name=$1 url=$2 deadline=$((SECONDS + START_TIMEOUT))
  until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; do
    alive "$name" || fail_start "$name" "exited before $url answered"
    [ $SECONDS -lt $deadline ] || fail_start "$name" "did not answer $url within ${START_TIMEOUT}s"
    sleep 0.3
  done
}

start_bg() {  # start_bg NAME CMD...: in its own session, so it outlives this script and its terminal
  local name=$1; shift
  setsid "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
}

case "${1:-start}" in
  stop) stop_all; exit 0 ;;
  status) status; exit $? ;;
  start) ;;
  *) echo "usage: bash scripts/quickstart.sh [start|stop|status]" >&2; exit 2 ;;
esac

START=$SECONDS
if [ "${KVMESH_SKIP_SETUP:-0}" != 1 ]; then
  echo "quickstart: [1/4] setting up (scripts/setup.sh; the first time ~5-10 min, then seconds)"
  bash scripts/setup.sh
else
  echo "quickstart: [1/4] setting up: skipped (KVMESH_SKIP_SETUP=1)"
fi
. .venv/bin/activate

mkdir -p "$RUN_DIR"
stop_all  # a previous run's services would hold the ports

# The bearer token every request must carry (made once; only its owner may read it).
TOKEN_FILE=$RUN_DIR/token
if [ ! -s "$TOKEN_FILE" ]; then
  (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(32))' >"$TOKEN_FILE")
fi
chmod 600 "$TOKEN_FILE"
export KVMESH_AUTH_TOKEN_FILE=$TOKEN_FILE

echo "quickstart: [2/4] starting kvmesh-controller on localhost:$CONTROLLER_PORT (gRPC $MONITOR_PORT)"
start_bg controller kvmesh-controller --host localhost --port "$CONTROLLER_PORT" --monitor-port "$MONITOR_PORT"
wait_http controller "http://localhost:$CONTROLLER_PORT/healthz"

echo "quickstart: [3/4] starting kvmesh-serve on localhost:$ENGINE_PORT with LMCACHE_CONFIG_FILE=$CONFIG" \
     "(setup prepared the model and its codec files; without setup the first start makes them, ~1-3 min)"
engine_env=("LMCACHE_CONFIG_FILE=$CONFIG")
if [ -n "${KVMESH_MONITOR_PORT:-}" ]; then  # the agent must register where the controller listens
  engine_env+=("LMCACHE_CONTROLLER_PULL_URL=localhost:$MONITOR_PORT")
fi
start_bg engine env "${engine_env[@]}" kvmesh-serve --port "$ENGINE_PORT"
wait_http engine "http://localhost:$ENGINE_PORT/health"
echo "quickstart: [4/4] both services are up; compressing and decompressing a prompt's KV cache"

if ! python scripts/seed_flow.py --engine "http://localhost:$ENGINE_PORT" \
       --controller "http://localhost:$CONTROLLER_PORT"; then
  echo "quickstart: the walk-through failed; the services are still running (logs in $RUN_DIR)" >&2
  echo "stop them with: bash scripts/quickstart.sh stop" >&2
  exit 1
fi

TOKEN_SHOWN=$TOKEN_FILE
case $TOKEN_FILE in "$REPO"/*) TOKEN_SHOWN=${TOKEN_FILE#"$REPO"/} ;; esac
cat <<EOF

quickstart: done in $((SECONDS - START)) s. The controller (http://localhost:$CONTROLLER_PORT, gRPC localhost:$MONITOR_PORT)
and the engine (http://localhost:$ENGINE_PORT) keep running for your own calls, e.g.:
  curl -X POST http://localhost:$ENGINE_PORT/v1/completions -H "Authorization: Bearer \$(cat $TOKEN_SHOWN)" \\
    -H "Content-Type: application/json" \\
    -d '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "What is a KV cache?", "max_tokens": 20}'
  KVMESH_AUTH_TOKEN_FILE=$TOKEN_SHOWN .venv/bin/kvmesh --controller localhost:$MONITOR_PORT events
Logs: $RUN_DIR/controller.log, $RUN_DIR/engine.log
Stop them with: bash scripts/quickstart.sh stop
EOF
