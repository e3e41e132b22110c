#!/usr/bin/env python3
"""The images' HEALTHCHECK: exits 0 when every target answers healthy, 1 otherwise.

Targets come from ``KVMESH_HEALTHCHECK`` (comma-separated ``grpc://host:port`` for the standard gRPC
health service, ``http://host:port/path`` for a 2xx answer), or else from the role the entrypoint
noted (``$TMPDIR/kvmesh-role``) with that process's default ports. Docker runs it inside the
container; Kubernetes uses its own probes instead (see deploy/kubernetes).

The gRPC health service needs no token, but a server with TLS needs TLS: the channel comes from
kvmesh's one factory with the process's own settings (``KVMESH_TLS_CERT_FILE``, ``KVMESH_TLS_KEY_FILE``,
``KVMESH_TLS_CA_FILE``; the client certificate is shown when the server asks for one).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.core.channels import channel
from kvmesh.core.security import SecuritySettings

DEFAULT_TARGETS = {
    "controller": "grpc://127.0.0.1:9001",
    "agent": "grpc://127.0.0.1:8001",
    "serve": "http://127.0.0.1:8000/health",
}
TIMEOUT_S = 4.0


def targets_from_env(env: dict[str, str]) -> list[str]:
    """The targets to check: ``KVMESH_HEALTHCHECK`` if set, else the noted role's default."""
    explicit = env.get("KVMESH_HEALTHCHECK", "").strip()
    if explicit:
        return [t.strip() for t in explicit.split(",") if t.strip()]
    role_file = Path(env.get("TMPDIR", "/tmp")) / "kvmesh-role"
    try:
        role = role_file.read_text().strip()
    except OSError:
        role = "serve"  # the image's default command
    return [DEFAULT_TARGETS.get(role, DEFAULT_TARGETS["serve"])]


def check(target: str) -> str | None:
    """None when ``target`` is healthy, else why not."""
    if target.startswith("grpc://"):
        address = target[len("grpc://"):]
        try:
            security = SecuritySettings.load()
        except ValueError as err:  # an unreadable token or TLS file named by the environment
            return f"{target}: {err}"
        try:
            with channel(address, security) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            return f"{target}: {err.code().name}"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
        return None
    if target.startswith(("http://", "https://")):
        try:
            with _http_get(target, os.environ) as resp:
                return None if 200 <= resp.status < 300 else f"{target}: HTTP {resp.status}"
        # URLError, HTTPError and ssl errors are OSErrors; an unreadable token file a ValueError.
        except (OSError, ValueError) as err:
            return f"{target}: {err}"
    return f"{target}: unknown scheme (use grpc:// or http://)"


def _http_get(url: str, env: Mapping[str, str]) -> Any:
    """GET ``url`` as the process's own clients would: with its bearer token (health routes are open,
    but a KVMESH_HEALTHCHECK target may be any route) and, for https, trusting ``KVMESH_TLS_CA_FILE``
    and showing ``KVMESH_TLS_CERT_FILE``/``_KEY_FILE`` when the server asks (mutual TLS)."""
    import ssl

    from kvmesh.core.auth import bearer_value, load_token

    token = load_token(env.get("KVMESH_AUTH_TOKEN_FILE") or None)
    headers = {"Authorization": bearer_value(token)} if token else {}
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=env.get("KVMESH_TLS_CA_FILE") or None)
        if env.get("KVMESH_TLS_CERT_FILE") and env.get("KVMESH_TLS_KEY_FILE"):
            context.load_cert_chain(env["KVMESH_TLS_CERT_FILE"], env["KVMESH_TLS_KEY_FILE"])
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S, context=context)


def main() -> int:
    failures = [why for why in map(check, targets_from_env(dict(os.environ))) if why]
    for why in failures:
        print(f"unhealthy: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
