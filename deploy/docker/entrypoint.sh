#!/bin/sh
# The images' entrypoint: `controller`, `agent` or `serve` (then that process's flags) runs the
# kvmesh process of that name; anything else runs as a command (e.g. `vllm serve ...`).
# The role is noted in a file so that kvmesh-healthcheck knows what to check without flags.
set -eu

role="${1:-serve}"
case "$role" in
  controller|agent|serve)
    [ "$#" -gt 0 ] && shift
    printf '%s\n' "$role" > "${TMPDIR:-/tmp}/kvmesh-role" 2>/dev/null || true
    exec "kvmesh-$role" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
