"""Where a compress admission's time goes inside the controller, piece by piece, in-process (no network):
the companion of ``bench_admission.py``, whose closed-loop latency is 8 connections x this cost plus
the gRPC path's own (CheckFinish, the cheapest RPC, measures that floor there).

    python bench/bench_admission_cost.py [--tokens 1024] [--chunk-size 256] [--calls 3000]

A controller (``ControllerServer``, ports 0, events in memory or in SQLite with ``--event-db file``) holds
one worker whose index knows every chunk already compressed, as after a first compress, so each
admission ends at once with no agent call, as in ``bench_admission.py``. Prints one markdown row per
piece: µs of CPU per call (``time.thread_time``: this thread only, the figure least moved by other load)
and the share of the whole handler.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.api.controller.v1 import controller_pb2 as pb  # noqa: E402
from kvmesh.controller.events import new_event_id  # noqa: E402
from kvmesh.controller.gateway import _build  # noqa: E402
from kvmesh.controller.registry import SpanKeys  # noqa: E402
from kvmesh.controller.server import ControllerServer  # noqa: E402
from kvmesh.controller.settings import ControllerSettings  # noqa: E402
from kvmesh.core.keys import chunk_spans  # noqa: E402

METHOD = "lossless"
LOCATION = "LocalCPUBackend"


def cpu_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


async def async_cpu_us(fn: Callable[[], object], calls: int) -> float:
    await fn()  # type: ignore[misc]
    t0 = time.thread_time()
    for _ in range(calls):
        await fn()  # type: ignore[misc]
    return (time.thread_time() - t0) / calls * 1e6


async def measure(args: argparse.Namespace) -> list[tuple[str, float]]:
    tmp = tempfile.mkdtemp(prefix="kvmesh-cost-")
    event_db = os.path.join(tmp, "events.sqlite3") if args.event_db == "file" else ":memory:"
    server = ControllerServer(ControllerSettings(host="127.0.0.1", port=0, monitor_port=0, event_db=event_db,
                                                 max_events=100_000))
    await server.start()
    try:
        svc = server.service
        w = svc.registry.register(instance_id="b", worker_id=0, ip="127.0.0.1", port=1, peer_init_url="",
                                  methods=[METHOD], locations=[LOCATION], chunk_size=args.chunk_size,
                                  heartbeat_interval=0)
        tokens = list(range(args.tokens))
        spans = chunk_spans(tokens, args.chunk_size)
        svc.registry.report_kv_events("b", 0, [(1, LOCATION, s.key, s.end) for s in spans], True, secret=w.secret)
        keys = SpanKeys(tokens)
        for i in range(len(spans)):
            svc.registry.note_form(w, LOCATION, keys, i, METHOD, 1000)
        req = pb.CompressRequest(instance_id="b", method=METHOD, location=LOCATION, tokens=tokens)
        wire = req.SerializeToString()
        rpc = next(r for r in server.rpcs if r.name == "Compress")
        n = args.calls
        held = {0: (len(tokens), len(spans))}

        def lifecycle() -> None:
            ev = svc.events.create(1, instance_id="b", method=METHOD, location=LOCATION, num_tokens=len(tokens),
                                   worker_ids=[0], chunks_total=len(spans))
            settled = svc._settled([w], LOCATION, keys, held, METHOD)  # noqa: SLF001
            assert settled is not None
            svc._end_settled(ev.event_id, settled)  # noqa: SLF001

        whole = await async_cpu_us(lambda: svc.compress(req), n)
        rows = [
            ("parse the gRPC request (protobuf, 1 message)", cpu_us(lambda: pb.CompressRequest.FromString(wire), n)),
            ("copy and check the tokens (`_tokens`)", cpu_us(lambda: svc._tokens(req.tokens), n)),  # noqa: SLF001
            ("chunk keys of the tokens (blake2b per chunk)",
             cpu_us(lambda: SpanKeys(tokens).get(args.chunk_size, len(spans) - 1), n)),
            ("index: prefix held + chunks' forms (keys hashed)",
             cpu_us(lambda: (w.prefix(keys, LOCATION), svc.registry.all_in_form(w, LOCATION, keys, len(spans),
                                                                                   METHOD)), n)),
            ("event: create, start, chunks, finish (+ store mark)", cpu_us(lifecycle, n)),
            ("event id (UUIDv7, `new_event_id`)", cpu_us(lambda: new_event_id("Compress"), n)),
            ("whole handler (`compress`, all of the above)", whole),
            ("HTTP only: JSON dict -> request message", cpu_us(lambda: _build(
                rpc, {"instance_id": "b", "method": METHOD, "location": LOCATION, "tokens": tokens}, {}, 1 << 20),
                n)),
            ("whole CheckFinish handler, for comparison", await async_cpu_us(
                lambda: svc.check_finish(pb.CheckFinishRequest(event_id=next(iter(svc.events.in_flight()), "") or
                                                              svc.events.recent(1)[0].event_id)), n)),
        ]
        await svc.events.flush(trim=True)
        return [(name, us) for name, us in rows] + [("(whole handler)", whole)]
    finally:
        await server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--event-db", choices=("memory", "file"), default="file")
    args = p.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = asyncio.run(measure(args))
    whole = rows[-1][1]
    print(f"compress admission cost in-process: {os.cpu_count()} CPUs, load average {load}, {args.tokens} tokens "
          f"in chunks of {args.chunk_size}, events in {args.event_db}, {args.calls} calls per row\n")
    print("| piece | CPU µs per call | share of the handler |")
    print("| --- | ---: | ---: |")
    for name, us in rows[:-1]:
        print(f"| {name} | {us:,.1f} | {100 * us / whole:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
