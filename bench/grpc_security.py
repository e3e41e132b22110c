"""What the mesh's gRPC bootstrap costs per call: a bare grpc.aio server against ``MeshServer`` with
no token, with the token, and with mutual TLS and the token (certificates from scripts/make_certs.sh).

    python bench/grpc_security.py [--calls 2000] [--concurrency 1,8] [--rounds 3]

One process, loopback, a trivial unary handler (16-byte request and answer), the client on the same
event loop through the mesh's channel factory (the bare row: a plain insecure channel). Prints one
markdown row per setup and concurrency: calls/s, the p50/p99 latency and the process CPU time per call
(client and server together; the steadiest figure on a shared machine), in microseconds: the best
of ``--rounds`` rounds for each (other processes only ever make a round slower).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.core.channels import aio_channel  # noqa: E402
from kvmesh.core.grpc_server import MeshServer  # noqa: E402
from kvmesh.core.security import SecuritySettings  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
SERVICE = "kvmesh.bench.Echo"


async def _echo(request: bytes, context: Any) -> bytes:
    return request


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})


async def _bare_server() -> tuple[Any, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _mesh_server(security: SecuritySettings) -> tuple[Any, int]:
    server = MeshServer(security)
    server.add_generic_handler(SERVICE, _handler())
    port = server.bind("127.0.0.1", 0)
    await server.start()
    return server, port


async def _measure(ch: grpc.aio.Channel, calls: int, concurrency: int) -> tuple[float, float, float, float]:
    echo = ch.unary_unary(f"/{SERVICE}/Echo")
    for _ in range(50):  # warm the connection
        await echo(b"x" * 16, timeout=10)
    latencies: list[float] = []
    per_worker = calls // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter()
            await echo(b"x" * 16, timeout=10)
            latencies.append(time.perf_counter() - t0)

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / wall, statistics.median(latencies) * 1e6, p99 * 1e6, cpu / len(latencies) * 1e6


async def main_async(calls: int, concurrency: list[int], certs: Path, rounds: int) -> None:
    mtls_server = SecuritySettings(token=TOKEN, tls_cert=str(certs / "server.crt"),
                                   tls_key=str(certs / "server.key"), tls_ca=str(certs / "ca.crt"))
    mtls_client = SecuritySettings(token=TOKEN, tls_cert=str(certs / "client.crt"),
                                   tls_key=str(certs / "client.key"), tls_ca=str(certs / "ca.crt"))
    setups = [("bare grpc.aio (no interceptor)", None, None),
              ("MeshServer, no token", SecuritySettings(), SecuritySettings()),
              ("MeshServer, token", SecuritySettings(token=TOKEN), SecuritySettings(token=TOKEN)),
              ("MeshServer, mTLS + token", mtls_server, mtls_client)]
    print(f"\n{calls} unary calls of 16 bytes per row, loopback, one process\n")
    print("| setup | concurrency | calls/s | p50 (us) | p99 (us) | CPU per call, client + server (us) |")
    print("|---|---|---|---|---|---|")
    for name, server_sec, client_sec in setups:
        server, port = await (_bare_server() if server_sec is None else _mesh_server(server_sec))
        target = f"localhost:{port}"
        ch = grpc.aio.insecure_channel(target) if client_sec is None else aio_channel(target, client_sec)
        try:
            for conc in concurrency:
                runs = [await _measure(ch, calls, conc) for _ in range(rounds)]
                rate, p50, p99, cpu = (max(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs),
                                       min(r[3] for r in runs))
                print(f"| {name} | {conc} | {rate:,.0f} | {p50:,.0f} | {p99:,.0f} | {cpu:,.0f} |")
        finally:
            await ch.close()
            await server.stop(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        subprocess.run(["bash", str(Path(__file__).resolve().parent.parent / "scripts" / "make_certs.sh"),
                        str(certs)], check=True, capture_output=True)
        asyncio.run(main_async(args.calls, [int(c) for c in args.concurrency.split(",")], certs, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
