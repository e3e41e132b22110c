"""The event table: lifecycle, progress, watchers, and its bounds in time and count."""
from __future__ import annotations

import asyncio
import time
import types
import uuid

import pytest

from kvmesh.api.common.v1 import common_pb2
from kvmesh.controller import events as events_module
from kvmesh.controller.events import EventTable, new_event_id
from kvmesh.controller.metrics import ControllerMetrics
from kvmesh.errors import NotFound


def sample(metrics: ControllerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def progress(worker: int, index: int, before: int, after: int) -> common_pb2.ChunkProgress:
    return common_pb2.ChunkProgress(worker_id=worker, chunk_index=index, bytes_before=before, bytes_after=after)


def test_lifecycle_counts_bytes_and_metrics() -> None:
    m = ControllerMetrics()
    t = EventTable(m)
    ev = t.create(common_pb2.COMPRESS, instance_id="i", method="cachegen", location="LocalCPUBackend",
                  num_tokens=12, worker_ids=[0, 1])
    assert ev.event_id.startswith("Compress") and len(ev.event_id) == len("Compress") + 32
    assert t.get(ev.event_id).status == common_pb2.PENDING
    assert sample(m, "kvmesh_events_in_flight", operation="compress") == 1
    t.start(ev.event_id, {0: 2, 1: 1})
    got = t.get(ev.event_id)
    assert got.status == common_pb2.RUNNING and got.chunks_total == 3 and got.started_time > 0
    t.chunk_done(ev.event_id, progress(0, 0, 1000, 250))
    t.chunk_done(ev.event_id, progress(0, 1, 1000, 250))
    t.chunk_done(ev.event_id, progress(1, 0, 500, 500))
    t.worker_finished(ev.event_id, 0)
    t.worker_finished(ev.event_id, 1)
    t.finish(ev.event_id, common_pb2.COMPLETED)
    got = t.get(ev.event_id)
    assert got.status == common_pb2.COMPLETED
    assert (got.chunks_done, got.bytes_before, got.bytes_after) == (3, 2500, 1000)
    assert got.compression_ratio == pytest.approx(2.5)
    assert [(w.worker_id, w.status, w.chunks_done, w.bytes_after) for w in got.workers] == [
        (0, common_pb2.COMPLETED, 2, 500), (1, common_pb2.COMPLETED, 1, 500)]
    labels = {"operation": "compress", "method": "cachegen", "location": "LocalCPUBackend"}
    assert sample(m, "kvmesh_events_total", **labels, outcome="completed") == 1
    assert sample(m, "kvmesh_chunks_total", **labels) == 3
    assert sample(m, "kvmesh_bytes_before_total", **labels) == 2500
    assert sample(m, "kvmesh_compression_ratio", method="cachegen", location="LocalCPUBackend") == pytest.approx(2.5)
    assert sample(m, "kvmesh_events_in_flight", operation="compress") == 0
    # An ended event does not change any more.
    t.chunk_done(ev.event_id, progress(0, 2, 1, 1))
    t.finish(ev.event_id, common_pb2.FAILED, "late")
    assert t.get(ev.event_id).chunks_done == 3 and t.get(ev.event_id).status == common_pb2.COMPLETED


def test_failed_worker_and_fail_in_flight() -> None:
    m = ControllerMetrics()
    t = EventTable(m)
    a = t.create(common_pb2.DECOMPRESS, instance_id="i", worker_ids=[0])
    b = t.create(common_pb2.PIN, instance_id="j", worker_ids=[0])
    t.start(a.event_id)
    assert t.fail_in_flight(lambda e: e.instance_id == "i", "worker 0 marked down") == [a.event_id]
    got = t.get(a.event_id)
    assert got.status == common_pb2.FAILED and got.error == "worker 0 marked down"
    assert got.workers[0].status == common_pb2.FAILED and got.workers[0].error == "worker 0 marked down"
    assert t.get(b.event_id).status == common_pb2.PENDING
    assert sample(m, "kvmesh_events_total", operation="decompress", method="", location="", outcome="failed") == 1


def test_ttl_drops_ended_events_only() -> None:
    t = EventTable(ControllerMetrics(), ttl_seconds=60, max_events=100)
    done = t.create(common_pb2.CLEAR, instance_id="i")
    t.finish(done.event_id, common_pb2.COMPLETED)
    running = t.create(common_pb2.CLEAR, instance_id="i")
    assert t.prune(now=time.time() + 30) == 0
    assert t.prune(now=time.time() + 120) == 1
    with pytest.raises(NotFound, match="not found"):
        t.get(done.event_id)
    assert t.get(running.event_id).status == common_pb2.PENDING


def test_count_bound_drops_oldest_ended_events() -> None:
    t = EventTable(ControllerMetrics(), max_events=3)
    first = t.create(common_pb2.PIN, instance_id="i")  # stays in flight: never dropped
    ended = []
    for _ in range(4):
        ev = t.create(common_pb2.PIN, instance_id="i")
        t.finish(ev.event_id, common_pb2.COMPLETED)
        ended.append(ev.event_id)
    assert len(t) == 3
    assert t.get(first.event_id).status == common_pb2.PENDING
    assert [e.event_id for e in t.recent()] == [ended[3], ended[2], first.event_id]
    assert [e.event_id for e in t.recent(limit=1)] == [ended[3]]


async def test_watch_sees_every_change_then_ends() -> None:
    t = EventTable(ControllerMetrics())
    ev = t.create(common_pb2.COMPRESS, instance_id="i", method="lossless", location="L", worker_ids=[0])
    seen: list[tuple[int, int, int | None]] = []

    async def watcher() -> None:
        async for event, prog in t.watch(ev.event_id):
            seen.append((event.status, event.chunks_done, prog.chunk_index if prog else None))

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0)
    t.start(ev.event_id, {0: 2})
    t.chunk_done(ev.event_id, progress(0, 0, 10, 5))
    t.chunk_done(ev.event_id, progress(0, 1, 10, 5))
    t.worker_finished(ev.event_id, 0)
    t.finish(ev.event_id, common_pb2.COMPLETED)
    await asyncio.wait_for(task, 5)
    assert seen[0] == (common_pb2.PENDING, 0, None)
    assert (common_pb2.RUNNING, 1, 0) in seen and (common_pb2.RUNNING, 2, 1) in seen
    assert seen[-1][0] == common_pb2.COMPLETED
    # Watching an ended event gives its final state once.
    final = [e async for e, _ in t.watch(ev.event_id)]
    assert len(final) == 1 and final[0].status == common_pb2.COMPLETED


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventTable(ControllerMetrics(), ttl_seconds=0)


def test_bounds_over_http() -> None:
    from .harness import ControllerThread

    with ControllerThread(event_ttl=0.3, max_events=3) as c:
        c.register("inst", 0)
        ids = []
        for _ in range(5):
            r = c.post("/compress", {"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend"})
            assert r.status == 200
            ids.append(r.body["event_id"])
        # At most three kept: the newest.
        listed = [e["event_id"] for e in c.http("GET", "/events").body["events"]]
        assert listed == ids[:1:-1]
        assert c.http("GET", f"/events/{ids[0]}").status == 404
        # After the time-to-live, ended events are gone.
        deadline = time.monotonic() + 10
        while c.http("GET", f"/events/{ids[-1]}").status == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.http("GET", f"/events/{ids[-1]}")
        assert r.status == 404 and "time-to-live" in r.body["error"]["message"]


def test_event_ids_are_time_ordered_uuid7_in_lmcache_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Operation name + 32 hex digits (a UUIDv7): ids made in later milliseconds sort after earlier ones,
    which keeps the event store's key index appending, and none repeat."""
    now = [1_700_000_000_000_000_000]
    monkeypatch.setattr(events_module, "time", types.SimpleNamespace(
        time_ns=lambda: now[0], time=time.time, monotonic=time.monotonic))
    ids = []
    for _ in range(2000):
        ids.append(new_event_id("Compress"))
        now[0] += 1_000_000  # 1 ms
    assert all(len(e) == len("Compress") + 32 and e.startswith("Compress") for e in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    u = uuid.UUID(ids[0][len("Compress"):])
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert int(u.hex[:12], 16) == 1_700_000_000_000  # the Unix milliseconds lead
    # Within one millisecond: still distinct (74 random bits).
    assert len({new_event_id("Pin") for _ in range(2000)}) == 2000
