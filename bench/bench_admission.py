"""Controller admission benchmark: compress admission latency and check_finish throughput, over gRPC
and over the HTTP gateway, with a real ``kvmesh-controller`` and a real ``kvmesh-agent`` on loopback.

    python bench/bench_admission.py [--connections 8] [--seconds 5] [--tokens 1024] [--chunk-size 256]

The agent holds ``--tokens`` tokens of KV (compressed once beforehand, so later compresses find every
chunk already in the asked form); the controller's lookup index holds them and knows their form (from
that first event's progress), so admission answers ``num_tokens`` from the index and ends each later
compress at once, with no agent call (the "no agent call" column: the share of compresses so ended). Each
phase runs ``--connections`` concurrent clients (one connection each: a gRPC channel, an HTTP
keep-alive connection) for ``--seconds``, every client sending its next request as soon as the last
one answered. Latency is measured in the client (client overhead included). Prints one markdown
row per phase: requests, requests/s, p50/p99/max latency in ms, refusals (429 /
RESOURCE_EXHAUSTED), the share of admissions whose prefix came from the index, the share of events
ended at admission with no agent call, the serving process's CPU time per request ("server CPU": the
controller's, or the floor servicer's for the floor rows; user + system, from /proc: a figure that holds
on a loaded machine, where latencies do not) and this process's ("client CPU").

``--rate R`` runs open loop instead: the clients together send R requests/s (each client at R/N,
evenly spaced), which shows the latency of a controller that is not saturated; the default closed
loop shows the most it serves, where latency is the connections over the throughput.

``--profile-controller FILE`` runs the controller under cProfile and writes its profile to FILE.

The floor: the same clients and requests against a no-op ``grpc.aio`` servicer of the Controller
service in a process of its own (no interceptor, no token, a constant answer; it only parses the request
and builds the response), the "floor" phases. They say what this machine's Python gRPC stack allows
with 8 closed-loop connections, whatever the controller does. "client CPU" is this process's CPU time
per request (the clients share the machine's two cores with the server).

With ``KVMESH_AUTH_TOKEN_FILE`` (or ``--auth-token-file``) set, every process and call uses the token.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from kvmesh.api.common.v1 import common_pb2  # noqa: E402
from kvmesh.api.controller.v1 import controller_pb2 as pb  # noqa: E402
from kvmesh.api.controller.v1 import controller_pb2_grpc  # noqa: E402
from tests.support import console_script, free_port, wait_grpc_healthy, wait_http_ok  # noqa: E402

LOCATION = "LocalCPUBackend"
INSTANCE = "bench"


def load_token(path: str | None) -> str | None:
    path = path or os.environ.get("KVMESH_AUTH_TOKEN_FILE")
    return Path(path).read_text().strip() if path else None


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kv_tensor(num_tokens: int, layers: int = 4, channels: int = 64) -> common_pb2.Tensor:
    data = (np.random.default_rng(0).standard_normal((2, layers, num_tokens, channels)) * 0.5).astype(np.float16)
    return common_pb2.Tensor(dtype="float16", shape=list(data.shape), data=data.tobytes())


def serve_floor(port: int) -> None:
    """The floor: a no-op ``grpc.aio`` Controller servicer (Compress, CheckFinish) and health, no interceptor."""
    from grpc_health.v1 import health, health_pb2_grpc

    async def compress(req: pb.CompressRequest, _ctx: grpc.aio.ServicerContext) -> pb.CompressResponse:
        return pb.CompressResponse(event_id="Compress-" + "0" * 32, num_tokens=len(req.tokens))

    async def check_finish(_req: pb.CheckFinishRequest, _ctx: grpc.aio.ServicerContext) -> pb.CheckFinishResponse:
        return pb.CheckFinishResponse(status=common_pb2.COMPLETED, chunks_done=4, chunks_total=4)

    service = pb.DESCRIPTOR.services_by_name["Controller"].full_name
    handler = grpc.method_handlers_generic_handler(service, {
        "Compress": grpc.unary_unary_rpc_method_handler(compress, pb.CompressRequest.FromString,
                                                        pb.CompressResponse.SerializeToString),
        "CheckFinish": grpc.unary_unary_rpc_method_handler(check_finish, pb.CheckFinishRequest.FromString,
                                                           pb.CheckFinishResponse.SerializeToString)})

    async def run() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
    asyncio.run(run())


# What every error answer was (status and the start of its message), printed under the table.
ERRORS: collections.Counter[str] = collections.Counter()


class Phase:
    """Latencies and refusals of one phase."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.refused = 0
        self.errors = 0
        self.seconds = 0.0

    def row(self, index_share: str = "", cpu_seconds: float = 0.0, settled_share: str = "",
            client_cpu_seconds: float = 0.0) -> str:
        lat = sorted(self.latencies)
        n = len(lat)
        if not n:
            return (f"| {self.name} | 0 | - | - | - | - | {self.refused} | {self.errors} | {index_share} | "
                    f"{settled_share} | - | - |")
        p = lambda q: lat[min(n - 1, int(q * n))] * 1000  # noqa: E731
        cpu = f"{cpu_seconds / (n + self.refused) * 1e6:,.0f}"
        client = f"{client_cpu_seconds / (n + self.refused) * 1e6:,.0f}"
        return (f"| {self.name} | {n} | {n / self.seconds:,.0f} | {statistics.median(lat) * 1000:.2f} | "
                f"{p(0.99):.2f} | {lat[-1] * 1000:.1f} | {self.refused} | {self.errors} | {index_share} | "
                f"{settled_share} | {cpu} | {client} |")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_phase(phase: Phase, clients: int, seconds: float, make: Callable[[int], Awaitable[Callable[[], Awaitable[str]]]],
                    rate: float = 0.0) -> Phase:
    """``make(i)`` gives client i's request coroutine factory; each answers "ok", "refused" or "error"."""
    calls = [await make(i) for i in range(clients)]
    # Warm each connection up outside the measurement.
    for call in calls:
        await call()
    stop = time.perf_counter() + seconds

    period = clients / rate if rate > 0 else 0.0

    async def loop(call: Callable[[], Awaitable[str]], offset: float) -> None:
        next_at = time.perf_counter() + offset
        while time.perf_counter() < stop:
            if period:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += period
            t0 = time.perf_counter()
            outcome = await call()
            dt = time.perf_counter() - t0
            if outcome == "ok":
                phase.latencies.append(dt)
            elif outcome == "refused":
                phase.refused += 1
            else:
                phase.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c, i * period / clients) for i, c in enumerate(calls)))
    phase.seconds = time.perf_counter() - start
    return phase


def metric(http_base: str, name: str, labels: str, headers: dict[str, str]) -> float:
    req = urllib.request.Request(f"{http_base}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def bench(args: argparse.Namespace, grpc_target: str, http_base: str, token: str | None,
                event_id: str, method: str, controller_pid: int, floor: tuple[str, int] | None) -> list[str]:
    import httpx

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tokens = list(range(args.tokens))
    compress = pb.CompressRequest(instance_id=INSTANCE, method=method, location=LOCATION, tokens=tokens)
    compress_json = {"instance_id": INSTANCE, "method": method, "location": LOCATION, "tokens": tokens}
    channels: list[grpc.aio.Channel] = []
    http_clients: list[httpx.AsyncClient] = []

    async def grpc_client(request_of: Callable[[controller_pb2_grpc.ControllerStub], Awaitable[object]],  # noqa: ANN202
                          target: str = grpc_target):
        async def make(i: int) -> Callable[[], Awaitable[str]]:
            # One channel (one HTTP/2 connection) per client: distinct options keep gRPC from sharing it.
            ch = grpc.aio.insecure_channel(target, options=[("grpc.bench_client", i)])
            channels.append(ch)
            stub = controller_pb2_grpc.ControllerStub(ch)

            async def call() -> str:
                try:
                    await request_of(stub)
                    return "ok"
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        return "refused"
                    ERRORS[f"gRPC {err.code().name}: {(err.details() or '')[:120]}"] += 1
                    return "error"
            return call
        return make

    async def http_client(method_: str, path: str, body: object | None):  # noqa: ANN202
        async def make(i: int) -> Callable[[], Awaitable[str]]:
            client = httpx.AsyncClient(base_url=http_base, headers=headers, timeout=30,
                                       limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            http_clients.append(client)

            async def call() -> str:
                r = await client.request(method_, path, json=body)
                if r.status_code in (200, 429):
                    return "ok" if r.status_code == 200 else "refused"
                ERRORS[f"HTTP {r.status_code} {path}: {r.text[:120]}"] += 1
                return "error"
            return call
        return make

    rows = []
    check_finish = pb.CheckFinishRequest(event_id=event_id)
    phases = [
        ("gRPC Compress", await grpc_client(lambda s: s.Compress(compress, timeout=30, metadata=metadata)), True),
        ("gRPC CheckFinish", await grpc_client(lambda s: s.CheckFinish(check_finish, timeout=30,
                                                                       metadata=metadata)), False),
        ("HTTP POST /compress", await http_client("POST", "/compress", compress_json), True),
        ("HTTP POST /check_finish", await http_client("POST", "/check_finish", {"event_id": event_id}), False),
    ]
    if floor is not None:
        # The same clients and requests against the no-op servicer: what the gRPC stack allows.
        phases[2:2] = [
            ("floor: no-op gRPC Compress", await grpc_client(lambda s: s.Compress(compress, timeout=30), floor[0]),
             None),
            ("floor: no-op gRPC CheckFinish", await grpc_client(lambda s: s.CheckFinish(check_finish, timeout=30),
                                                                floor[0]), None)]
    phases = [ph for ph in phases if not args.only or any(o.lower() in ph[0].lower() for o in args.only.split(","))]
    try:
        for name, make, admission in phases:
            before = (metric(http_base, "kvmesh_admission_lookups_total", 'source="index"', headers),
                      metric(http_base, "kvmesh_admission_lookups_total", 'source="agent"', headers),
                      metric(http_base, "kvmesh_events_answered_from_index_total", 'operation="compress"', headers))
            server_pid = floor[1] if admission is None and floor is not None else controller_pid
            cpu0, client0 = cpu_seconds(server_pid), time.process_time()
            label = f"{name} ({args.connections} conn{f', {args.rate:g}/s offered' if args.rate else ''})"
            phase = await run_phase(Phase(label), args.connections, args.seconds, make, args.rate)
            cpu, client_cpu = cpu_seconds(server_pid) - cpu0, time.process_time() - client0
            share = settled = ""
            if admission:
                index = metric(http_base, "kvmesh_admission_lookups_total", 'source="index"', headers) - before[0]
                agent = metric(http_base, "kvmesh_admission_lookups_total", 'source="agent"', headers) - before[1]
                share = f"{100 * index / max(1.0, index + agent):.0f}%"
                ended = metric(http_base, "kvmesh_events_answered_from_index_total", 'operation="compress"',
                               headers) - before[2]
                settled = f"{100 * ended / max(1.0, index + agent):.0f}%"
            rows.append(phase.row(share, cpu, settled, client_cpu))
            # Admission runs ahead of the agent: let the events of a phase drain before the next one.
            deadline = time.monotonic() + 300
            while (metric(http_base, "kvmesh_events_in_flight", 'operation="compress"', headers) > 0
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.2)
    finally:
        for ch in channels:
            await ch.close()
        for client in http_clients:
            await client.aclose()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--auth-token-file", default=None)
    p.add_argument("--event-db", default="",
                   help="the controller's --event-db (default: a SQLite file in a temporary folder; "
                        "':memory:' measures without the store)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="open loop: requests/s offered over all connections (default: closed loop)")
    p.add_argument("--only", default="", help="run only the phases whose name contains one of these "
                   "comma-separated words (e.g. 'grpc compress')")
    p.add_argument("--heartbeat-port", type=int, default=None,
                   help="the controller's --heartbeat-port (default: its own default, a free port; -1 serves "
                        "heartbeats on the main gRPC port, as before the heartbeat server)")
    p.add_argument("--profile-controller", default=None, metavar="FILE",
                   help="run the controller under cProfile, its profile written to FILE")
    p.add_argument("--no-floor", action="store_true", help="skip the no-op gRPC servicer's phases")
    p.add_argument("--serve-floor", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_floor is not None:
        serve_floor(args.serve_floor)
        return 0
    token = load_token(args.auth_token_file)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env = {"KVMESH_AUTH_TOKEN_FILE": args.auth_token_file} if args.auth_token_file else {}
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp_s:
        tmp = Path(tmp_s)
        http_port, grpc_port, agent_port = free_port(), free_port(), free_port()
        if args.profile_controller:
            launcher = [sys.executable, "-c", "import cProfile, sys; from kvmesh.controller.__main__ import main; "
                        f"cProfile.run('main(sys.argv[1:])', {args.profile_controller!r})"]
        else:
            launcher = [console_script("kvmesh-controller")]
        controller_args = [*launcher, "--host", "127.0.0.1", "--port", str(http_port),
                           "--monitor-port", str(grpc_port), "--event-db", args.event_db or str(tmp / "events.sqlite3"),
                           "--log-level", "WARNING"]
        if args.heartbeat_port is not None:
            controller_args += ["--heartbeat-port", str(args.heartbeat_port)]
        cfg = {"chunk_size": args.chunk_size, "local_cpu": True, "max_local_cpu_size": 1.0, "enable_controller": True,
               "lmcache_instance_id": INSTANCE, "controller_pull_url": f"127.0.0.1:{grpc_port}",
               "lmcache_worker_ports": agent_port, "lmcache_worker_heartbeat_time": 1.0, "p2p_host": "127.0.0.1",
               "p2p_init_ports": free_port()}
        (tmp / "agent.yaml").write_text(yaml.safe_dump(cfg))
        agent_args = [console_script("kvmesh-agent"), "--config", str(tmp / "agent.yaml"), "--metrics-port", "0",
                      "--host", "127.0.0.1", "--log-level", "WARNING"]
        http_base = f"http://127.0.0.1:{http_port}"
        grpc_target = f"127.0.0.1:{grpc_port}"
        floor_port = free_port()
        floor_args = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", str(floor_port)]
        floor_process = contextlib.nullcontext(None) if args.no_floor else process(floor_args, tmp / "floor.log", {})
        with process(controller_args, tmp / "controller.log", env) as controller, \
                process(agent_args, tmp / "agent.log", env), floor_process as floor:
            wait_grpc_healthy(grpc_target, timeout=60)
            if not args.no_floor:
                wait_grpc_healthy(f"127.0.0.1:{floor_port}", timeout=60)
            wait_http_ok(f"{http_base}/metrics", timeout=60)
            wait_grpc_healthy(f"127.0.0.1:{agent_port}", timeout=120)
            with grpc.insecure_channel(grpc_target) as ch, grpc.insecure_channel(
                    f"127.0.0.1:{agent_port}", options=[("grpc.max_send_message_length", 1 << 30)]) as ach:
                ctl = controller_pb2_grpc.ControllerStub(ch)
                agent = agent_pb2_grpc.InstanceAgentStub(ach)
                tokens = list(range(args.tokens))
                deadline = time.monotonic() + 60
                while not [w for w in ctl.QueryWorkerInfo(pb.QueryWorkerInfoRequest(instance_id="all"), timeout=10,
                                                          metadata=metadata).worker_infos if w.state == "up"]:
                    if time.monotonic() > deadline:
                        raise SystemExit("the agent did not register")
                    time.sleep(0.1)
                info = ctl.QueryWorkerInfo(pb.QueryWorkerInfoRequest(instance_id=INSTANCE), timeout=10,
                                           metadata=metadata).worker_infos[0]
                method = "lossless" if "lossless" in info.methods else info.methods[0]
                agent.PutChunks(agent_pb2.PutChunksRequest(location=LOCATION, tokens=tokens,
                                                           kv=kv_tensor(args.tokens)), timeout=60, metadata=metadata)
                while ctl.Lookup(pb.LookupRequest(tokens=tokens), timeout=10,
                                 metadata=metadata).layout_info.get(INSTANCE) is None:
                    if time.monotonic() > deadline:
                        raise SystemExit("the controller's index never held the tokens")
                    time.sleep(0.05)
                # Compress once: later compresses find every chunk already compressed.
                first = ctl.Compress(pb.CompressRequest(instance_id=INSTANCE, method=method, location=LOCATION,
                                                        tokens=tokens), timeout=30, metadata=metadata)
                for update in ctl.WatchEvent(pb.WatchEventRequest(event_id=first.event_id), timeout=300,
                                             metadata=metadata):
                    last = update
                assert last.event.status == common_pb2.COMPLETED, last.event.error
            rows = asyncio.run(bench(args, grpc_target, http_base, token, first.event_id, method, controller.pid,
                                     None if floor is None else (f"127.0.0.1:{floor_port}", floor.pid)))
    print(f"load average before: {load_before}, after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"controller admission on loopback: {os.cpu_count()} CPUs, {args.tokens} tokens in "
          f"{-(-args.tokens // args.chunk_size)} chunks of {args.chunk_size}, method {method}, "
          f"{args.seconds:.0f} s per phase\n")
    print("| phase | requests | req/s | p50 ms | p99 ms | max ms | refused | errors | from index | no agent call "
          "| server CPU µs/req | client CPU µs/req |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)
    for what, n in ERRORS.most_common():
        print(f"error x{n}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
