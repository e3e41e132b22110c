"""HTTP gateway benchmark: a real ``kvmesh-controller`` process (uvicorn + Starlette), loopback.

    python bench/bench_http_gateway.py [--seconds 5] [--connections 1,8] [--big-mb 20]

Prints two markdown tables:
1. small requests (GET /events, POST /lookup with 12 tokens, GET /healthz) with N keep-alive
   connections: requests/s, p50 and p99 latency;
2. a hostile big body: while one client posts a ``--big-mb`` MB /compress (2 bytes per token, far
   over --max-tokens), another polls GET /events: how long the big request took, its status, and the
   poller's count, p99 and worst latency during it (the loop must keep serving).
No agent is registered: the controller's own work (routing, parsing, the event table) is measured.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import console_script, free_port, running, wait_http_ok  # noqa: E402

SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
REQUESTS = {
    "GET /events": ("GET", "/events", None),
    "POST /lookup (12 tokens)": ("POST", "/lookup", json.dumps({"tokens": SEED_TOKENS}).encode()),
    "GET /healthz": ("GET", "/healthz", None),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hammer(port: int, method: str, path: str, body: bytes | None, seconds: float, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            start = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}")
            out.append(time.perf_counter() - start)
    finally:
        conn.close()


def small_requests(port: int, seconds: float, connections: list[int]) -> None:
    print("| request | connections | req/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (method, path, body) in REQUESTS.items():
        for n in connections:
            per_thread: list[list[float]] = [[] for _ in range(n)]
            threads = [threading.Thread(target=hammer, args=(port, method, path, body, seconds, per_thread[i]))
                       for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            lat = [x for xs in per_thread for x in xs]
            print(f"| {name} | {n} | {len(lat) / seconds:,.0f} | {statistics.median(lat) * 1e3:.2f} | "
                  f"{percentile(lat, 0.99) * 1e3:.2f} |")


def big_body(port: int, megabytes: int) -> None:
    n = megabytes * 1024 * 1024 // 2
    body = (b'{"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend", "tokens": ['
            + b"1," * n + b"1]}")
    result: dict[str, float | int] = {}

    def post() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        start = time.perf_counter()
        conn.request("POST", "/compress", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        result.update(status=resp.status, seconds=time.perf_counter() - start)
        conn.close()

    poller: list[float] = []
    big = threading.Thread(target=post)
    big.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while big.is_alive():
        start = time.perf_counter()
        conn.request("GET", "/events")
        conn.getresponse().read()
        poller.append(time.perf_counter() - start)
    big.join()
    conn.close()
    print()
    print("| big body | status | its time s | GET /events during it | p99 ms | worst ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {len(body) / 1e6:.0f} MB /compress ({n + 1:,} tokens) | {result['status']} | "
          f"{result['seconds']:.2f} | {len(poller)} | {percentile(poller, 0.99) * 1e3:.1f} | {max(poller) * 1e3:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per row of the first table")
    p.add_argument("--connections", default="1,8", help="comma-separated connection counts")
    p.add_argument("--big-mb", type=int, default=20, help="size of the hostile body (0: skip)")
    args = p.parse_args()
    http_port, grpc_port = free_port(), free_port()
    cmd = [console_script("kvmesh-controller"), "--host", "127.0.0.1", "--port", str(http_port),
           "--monitor-port", str(grpc_port), "--log-level", "WARNING"]
    with running(cmd) as proc:
        wait_http_ok(f"http://127.0.0.1:{http_port}/healthz", timeout=60, proc=proc)
        small_requests(http_port, args.seconds, [int(x) for x in args.connections.split(",")])
        if args.big_mb:
            big_body(http_port, args.big_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
