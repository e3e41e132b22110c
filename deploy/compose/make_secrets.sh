#!/usr/bin/env bash
# Makes the secrets compose.yaml mounts: the shared bearer token (secrets/token) and, with
# scripts/make_certs.sh, the local CA and the mesh's and a client's certificates (certs/). Keeps what
# exists (remove a folder to make it anew).
#
#   deploy/compose/make_secrets.sh [DIR]     (DIR default: deploy/compose, where compose.yaml looks)
#
# Modes: compose bind-mounts secret files as they are (it ignores uid/gid/mode outside swarm), and the
# containers run as other users (kvmesh uid 10001, Prometheus nobody), so the files are made readable
# (0644) and the folders that hold them private to you on this host (0700).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$here}"

if ! command -v openssl >/dev/null 2>&1; then
  echo "make_secrets.sh: the openssl command is missing (Debian/Ubuntu: apt-get install openssl)" >&2
  exit 2
fi

mkdir -p "$out/secrets"
chmod 700 "$out/secrets"
if [[ ! -s "$out/secrets/token" ]]; then
  (umask 077 && openssl rand -hex 32 > "$out/secrets/token")
  echo "make_secrets.sh: a new token in $out/secrets/token"
fi
chmod 644 "$out/secrets/token"

if [[ ! -e "$out/certs/ca.key" ]]; then
  bash "$repo/scripts/make_certs.sh" "$out/certs"
fi
chmod 700 "$out/certs"
chmod 644 "$out/certs/ca.crt" "$out/certs/server.crt" "$out/certs/server.key" \
  "$out/certs/client.crt" "$out/certs/client.key"
# The CA's key signs new certificates: it stays private, and no container mounts it.
chmod 600 "$out/certs/ca.key"
echo "make_secrets.sh: token and certificates ready for deploy/compose/compose.yaml"
