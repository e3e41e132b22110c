#!/usr/bin/env bash
# A local CA and the certificates kvmesh's processes need for TLS / mutual TLS (openssl CLI only).
#
#   scripts/make_certs.sh [OUT_DIR] [EXTRA_SAN ...]     (OUT_DIR default: .kvmesh-certs, git-ignored)
#
# Writes into OUT_DIR (keys mode 0600):
#   ca.crt  ca.key        the CA: every process verifies its peers against ca.crt (--tls-ca)
#   server.crt server.key the mesh's certificate (serverAuth + clientAuth): controller, agents and
#                         engines serve with it and show it when they call a peer (--tls-cert/--tls-key)
#   client.crt client.key a client-only certificate for operators' tools (kvmesh CLI, grpcurl)
# SANs: localhost, 127.0.0.1, ::1, the compose services (controller, engine-a, engine-b) and the
# Kubernetes services of deploy/kubernetes (kvmesh-controller, kvmesh-engine in namespace kvmesh),
# plus every EXTRA_SAN (a DNS name, or an IP address). On Kubernetes, prefer cert-manager: agents
# register their pod IP, which a static certificate cannot name.
# Refuses to overwrite an existing OUT_DIR/ca.key (remove the folder to start again).
set -euo pipefail

if ! command -v openssl >/dev/null 2>&1; then
  echo "make_certs.sh: the openssl command is missing (Debian/Ubuntu: apt-get install openssl)" >&2
  exit 2
fi

out="${1:-.kvmesh-certs}"
shift || true
days="${KVMESH_CERT_DAYS:-825}"

if [[ -e "$out/ca.key" ]]; then
  echo "make_certs.sh: $out/ca.key exists; remove $out to make new certificates" >&2
  exit 1
fi
mkdir -p "$out"
chmod 700 "$out"
umask 077

dns=(localhost controller engine-a engine-b)
for svc in kvmesh-controller kvmesh-engine; do
  dns+=("$svc" "$svc.kvmesh" "$svc.kvmesh.svc" "$svc.kvmesh.svc.cluster.local")
done
dns+=("*.kvmesh-engine.kvmesh.svc.cluster.local")
ips=(127.0.0.1 ::1)
for san in "$@"; do
  if [[ "$san" =~ ^[0-9.]+$ || "$san" == *:* ]]; then ips+=("$san"); else dns+=("$san"); fi
done
sans=""
for d in "${dns[@]}"; do sans+="DNS:$d,"; done
for i in "${ips[@]}"; do sans+="IP:$i,"; done
sans="${sans%,}"

curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)

openssl req -x509 "${curve[@]}" -nodes -keyout "$out/ca.key" -out "$out/ca.crt" -days "$days" \
  -subj "/CN=kvmesh local CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

leaf() {  # leaf NAME CN EKU [SANS]
  local name="$1" cn="$2" eku="$3" san="${4:-}"
  openssl req "${curve[@]}" -nodes -keyout "$out/$name.key" -out "$out/$name.csr" -subj "/CN=$cn" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n "$san" ]] && echo "subjectAltName=$san"
  } > "$out/$name.ext"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -out "$out/$name.crt" -days "$days" -extfile "$out/$name.ext" 2>/dev/null
  rm -f "$out/$name.csr" "$out/$name.ext"
}

leaf server "kvmesh" "serverAuth,clientAuth" "$sans"
leaf client "kvmesh-client" "clientAuth"
rm -f "$out/ca.srl"
chmod 600 "$out"/*.key
chmod 644 "$out"/*.crt
echo "make_certs.sh: CA and certificates in $out (SANs: $sans)"
