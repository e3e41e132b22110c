"""kvmesh-serve's HTTP layer on this machine: route latency idle and during a generation, and a chat's
time to first token with and without the prompt's KV from the agent.

    .venv/bin/python bench/bench_engine_http.py [--requests 300] [--clients 8]

Starts a real ``kvmesh-serve`` (16-token chunks, local CPU storage, no controller) on a free port and
prints one table. Figures depend on the machine's load: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.engine.serving import MODEL, kvmesh_serve  # noqa: E402


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e3, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3


def timed(client: httpx.Client, method: str, url: str, body: dict | None = None) -> float:
    started = time.perf_counter()
    resp = client.request(method, url, json=body)
    resp.raise_for_status()
    return time.perf_counter() - started


def sequential(url: str, method: str, body: dict | None, n: int) -> list[float]:
    with httpx.Client(trust_env=False, timeout=120) as client:
        return [timed(client, method, url, body) for _ in range(n)]


def concurrent_rate(url: str, n: int, clients: int) -> float:
    def worker(count: int) -> None:
        with httpx.Client(trust_env=False, timeout=120) as client:
            for _ in range(count):
                timed(client, "GET", url)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, [n // clients] * clients))
    return (n // clients * clients) / (time.perf_counter() - started)


def during_generation(base: str, method: str, path: str, body: dict | None, n: int) -> list[float]:
    """Latency of ``path`` while a long streamed generation runs on the model thread."""
    started = threading.Event()
    done = threading.Event()

    def generate() -> None:
        with httpx.Client(trust_env=False, timeout=600) as client, client.stream(
                "POST", f"{base}/v1/completions", json={"model": MODEL, "prompt": "Count: one, two,",
                                                        "max_tokens": 4000, "ignore_eos": True, "stream": True}) as r:
            for _ in r.iter_lines():
                started.set()
                if done.is_set():
                    return

    thread = threading.Thread(target=generate)
    thread.start()
    started.wait(120)
    try:
        return sequential(base + path, method, body, n)
    finally:
        done.set()
        thread.join()


def chat_ttft(base: str, messages: list[dict]) -> float:
    with httpx.Client(trust_env=False, timeout=120) as client:
        started = time.perf_counter()
        with client.stream("POST", f"{base}/v1/chat/completions",
                           json={"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0,
                                 "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":""' not in line:  # the first token's chunk
                    return time.perf_counter() - started
    raise RuntimeError("no token came")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, kvmesh_serve(Path(tmp), ["--threads", str(os.cpu_count() or 1)]) as base:
        with httpx.Client(trust_env=False, timeout=120) as warm_up:  # the first forward pass pays one-off costs
            warm_up.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        tok = {"model": MODEL, "prompt": "The capital of France is Paris. " * 20}
        for name, method, path, body in (("GET /v1/models", "GET", "/v1/models", None),
                                         ("POST /tokenize (120 tokens)", "POST", "/tokenize", tok)):
            p50, p99 = percentiles(sequential(base + path, method, body, args.requests))
            rows.append((f"{name}, idle", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))
        rate = concurrent_rate(f"{base}/v1/models", args.requests * 2, args.clients)
        rows.append((f"GET /v1/models, {args.clients} clients", f"{rate:.0f} req/s"))
        for name, method, path, body in (("GET /health", "GET", "/health", None),
                                         ("POST /tokenize (120 tokens)", "POST", "/tokenize", tok)):
            p50, p99 = percentiles(during_generation(base, method, path, body, args.requests // 3))
            rows.append((f"{name}, during a generation", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))
        long_chat = [{"role": "system", "content": "Background: " + "the weather in Paris is mild. " * 60},
                     {"role": "user", "content": f"Is it cold? ({time.time_ns()})"}]
        cold, warm = chat_ttft(base, long_chat), chat_ttft(base, long_chat)
        rows.append(("chat TTFT, ~430-token prompt, prefilled", f"{cold * 1e3:.0f} ms"))
        rows.append(("chat TTFT, same prompt, KV from the agent", f"{warm * 1e3:.0f} ms"))
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | result |\n| {'-' * width} | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(json.dumps({"cpus": os.cpu_count(), "load": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
