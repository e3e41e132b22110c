#!/bin/sh
# The images' entrypoint: `controller`, `agent` or `serve` (then that process's flags) runs the
# kvmesh process of that name; anything else runs as a command (e.g. `vllm serve ...`).
# The role is noted in a file so that kvmesh-healthcheck knows what to check without flags.
# The files named by KVMESH_AUTH_TOKEN_FILE and KVMESH_TLS_*_FILE must be readable by this user
# (uid 10001): a mounted secret that is not stops the start here, saying which and why.
set -eu

for var in KVMESH_AUTH_TOKEN_FILE KVMESH_TLS_CERT_FILE KVMESH_TLS_KEY_FILE KVMESH_TLS_CA_FILE; do
  eval "file=\${$var:-}"
  if [ -n "$file" ] && [ ! -r "$file" ]; then
    if [ -e "$file" ]; then why="not readable by uid $(id -u)"; else why="missing"; fi
    echo "entrypoint: $var names $file, which is $why (compose: run deploy/compose/make_secrets.sh;" \
         "Kubernetes: create the Secret, see deploy/README.md)" >&2
    exit 2
  fi
done

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
