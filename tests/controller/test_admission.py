"""Bounds of the event table on a real controller: in-flight admission (429 / RESOURCE_EXHAUSTED),
watchers dropped when they fall behind, the count and time bounds popping in expiry order, and
failed chunks counted apart from done ones."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.controller.events import MAX_CHUNK_ERRORS, EventTable
from kvmesh.controller.metrics import ControllerMetrics
from kvmesh.errors import TooBusy

from .harness import ControllerThread
from .scripted_agent import ScriptedAgent, chunk, final

LOC = "LocalCPUBackend"
CHUNK = 16


@pytest.fixture
def agent() -> Iterator[ScriptedAgent]:
    with ScriptedAgent(CHUNK) as a:
        yield a


def compress_body(tokens: int = 64) -> dict[str, Any]:
    return {"instance_id": "inst", "method": "lossless", "location": LOC, "tokens": list(range(tokens))}


def test_in_flight_cap_answers_429_then_admits_again(agent: ScriptedAgent) -> None:
    with ControllerThread(max_in_flight=2) as c:
        c.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        first = [c.post("/compress", compress_body()) for _ in range(2)]
        assert [r.status for r in first] == [200, 200]
        # Both events hold their streams open (the scripted agent waits): the third is refused.
        r = c.post("/compress", compress_body())
        assert r.status == 429, r.body
        assert "in flight" in r.body["error"]["message"] and "--max-in-flight" in r.body["error"]["message"]
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Decompress(pb.DecompressRequest(instance_id="inst", location=LOC, tokens=[1, 2]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Refused before any agent round trip, and counted.
        lookups = agent.lookups
        assert c.post("/clear", {"instance_id": "inst", "location": LOC}).status == 429
        assert agent.lookups == lookups
        refused = c.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
            "kvmesh_admission_refused_total", {"reason": "events_in_flight"})
        assert refused == 3
        # Once the events end, there is room again.
        agent.release.set()
        for r in first:
            assert c.wait_event(r.body["event_id"]).event.status == common_pb2.COMPLETED
        assert c.post("/compress", compress_body()).status == 200


def test_reservations_count_against_the_cap() -> None:
    t = EventTable(ControllerMetrics(), max_events=100, max_in_flight=2)
    t.reserve()
    t.create(common_pb2.PIN, instance_id="i")
    with pytest.raises(TooBusy):
        t.create(common_pb2.PIN, instance_id="i")  # one in flight + one reserved
    t.create(common_pb2.PIN, instance_id="i", reserved=True)  # the reservation turns into the event
    with pytest.raises(TooBusy):
        t.reserve()
    assert t.in_flight_count == 2


def test_in_flight_never_exceeds_max_events() -> None:
    t = EventTable(ControllerMetrics(), max_events=3, max_in_flight=10)
    for _ in range(3):
        t.create(common_pb2.PIN, instance_id="i")
    with pytest.raises(TooBusy):
        t.create(common_pb2.PIN, instance_id="i")
    assert len(t) == 3


def test_prune_and_count_bound_follow_the_order_events_ended() -> None:
    t = EventTable(ControllerMetrics(), ttl_seconds=60, max_events=4)
    a, b, c = (t.create(common_pb2.PIN, instance_id="i") for _ in range(3))
    # c ends first, then a: expiry order is the order they ended, not the order they began.
    t.finish(c.event_id, common_pb2.COMPLETED)
    t.finish(a.event_id, common_pb2.COMPLETED)
    d = t.create(common_pb2.PIN, instance_id="i")
    t.finish(d.event_id, common_pb2.COMPLETED)
    e = t.create(common_pb2.PIN, instance_id="i")  # 5 events over a bound of 4: the first to end goes
    assert {x.event_id for x in t.recent()} == {a.event_id, b.event_id, d.event_id, e.event_id}
    assert t.prune(now=time.time() + 120) == 2  # a and d: every ended one; b and e still run
    assert set(t.in_flight()) == {b.event_id, e.event_id} and len(t) == 2


async def test_a_watcher_that_does_not_read_is_dropped_with_a_bounded_queue() -> None:
    m = ControllerMetrics()
    t = EventTable(m, watch_queue_size=4)
    ev = t.create(common_pb2.COMPRESS, instance_id="i", worker_ids=[0])
    t.start(ev.event_id, {0: 100})
    watch = t.watch(ev.event_id)
    first, _ = await watch.__anext__()
    assert first.status == common_pb2.RUNNING
    entry = t._entries[ev.event_id]  # noqa: SLF001 - the bound itself is what is tested
    (watcher,) = entry.watchers
    for i in range(50):  # the watcher reads nothing meanwhile
        t.chunk_done(ev.event_id, common_pb2.ChunkProgress(worker_id=0, chunk_index=i, bytes_before=10,
                                                           bytes_after=5))
        assert len(watcher.updates) <= 4
    assert watcher.dropped and not watcher.updates
    with pytest.raises(TooBusy, match="too slow"):
        await watch.__anext__()
    assert not entry.watchers
    assert m.registry.get_sample_value("kvmesh_watchers_dropped_total") == 1
    # A reader keeping up is never dropped.
    seen = 0
    async for _event, _progress in t.watch(ev.event_id):
        seen += 1
        if seen == 1:
            for i in range(50, 53):
                t.chunk_done(ev.event_id, common_pb2.ChunkProgress(worker_id=0, chunk_index=i))
            t.finish(ev.event_id, common_pb2.COMPLETED)
    assert seen == 5


def test_slow_watcher_stream_ends_with_a_clear_error(agent: ScriptedAgent) -> None:
    with ControllerThread(watch_queue_size=8) as c:
        c.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        r = c.post("/compress", compress_body(CHUNK * 64))
        event_id = r.body["event_id"]
        stream = c.stub.WatchEvent(pb.WatchEventRequest(event_id=event_id), timeout=30)
        next(stream)

        def flood() -> None:  # 40 updates while the loop serves no watcher in between
            for i in range(1, 41):
                c.server.service.events.chunk_done(event_id, common_pb2.ChunkProgress(  # type: ignore[union-attr]
                    worker_id=0, chunk_index=i, token_start=i * CHUNK, token_end=(i + 1) * CHUNK,
                    bytes_before=100, bytes_after=50))
        c.sync(flood)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too slow" in err.value.details() and event_id in err.value.details()
        # The event itself goes on, and can be watched again.
        assert c.http("GET", f"/events/{event_id}").body["event"]["chunks_done"] >= 41


def test_watchers_are_capped(agent: ScriptedAgent) -> None:
    with ControllerThread(max_watchers=1) as c:
        c.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        event_id = c.post("/compress", compress_body()).body["event_id"]
        first = c.stub.WatchEvent(pb.WatchEventRequest(event_id=event_id), timeout=30)
        next(first)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(c.stub.WatchEvent(pb.WatchEventRequest(event_id=event_id), timeout=30)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "watches are open" in err.value.details()
        first.cancel()


def test_failed_chunks_are_counted_apart_with_their_errors(agent: ScriptedAgent) -> None:
    n = CHUNK * 30

    async def script(request: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        for i in range(30):
            yield chunk(i, CHUNK, n, error="disk full" if i % 3 == 0 else "")
        yield final(n, 30, 20, error="10 of 30 chunks failed")
    agent.script = script
    with ControllerThread() as c:
        c.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        r = c.post("/compress", compress_body(n))
        ev = c.wait_event(r.body["event_id"]).event
        assert ev.status == common_pb2.FAILED
        assert (ev.chunks_done, ev.chunks_failed, ev.chunks_total) == (20, 10, 30)
        w = ev.workers[0]
        assert (w.chunks_done, w.chunks_failed) == (20, 10)
        assert len(w.chunk_errors) == min(10, MAX_CHUNK_ERRORS) and w.chunk_errors[0] == "chunk 0: disk full"
        # Bytes only of the chunks done.
        assert (ev.bytes_before, ev.bytes_after) == (20 * 1000, 20 * 250)
        done = c.post("/check_finish", {"event_id": r.body["event_id"]}).body
        assert (done["status"], done["chunks_done"], done["chunks_failed"]) == ("FAILED", 20, 10)


def test_chunk_errors_list_is_bounded() -> None:
    t = EventTable(ControllerMetrics())
    ev = t.create(common_pb2.COMPRESS, instance_id="i", worker_ids=[0])
    for i in range(100):
        t.chunk_done(ev.event_id, common_pb2.ChunkProgress(worker_id=0, chunk_index=i, error="bad"))
    got = t.get(ev.event_id)
    assert got.chunks_failed == 100 and got.chunks_done == 0 and len(got.workers[0].chunk_errors) == MAX_CHUNK_ERRORS


def test_stream_deadline_scales_with_the_chunks() -> None:
    with ControllerThread(agent_timeout=5.0, chunk_timeout=2.0, event_timeout=100.0) as c:
        c.register("inst", 0, chunk_size=16)
        service = c.server.service  # type: ignore[union-attr]
        w = service.registry.get("inst", 0)
        assert service._stream_timeout(w, 16) == pytest.approx(7.0)  # noqa: SLF001
        assert service._stream_timeout(w, 160) == pytest.approx(25.0)  # noqa: SLF001
        assert service._stream_timeout(w, 16 * 1000) == pytest.approx(100.0)  # noqa: SLF001 - capped


def test_event_loop_never_waits_on_admission_of_a_full_table() -> None:
    # Many events kept, and many more created: create/get stay flat (no scan per call); checked by
    # the table never holding more than its bound while admitting thousands.
    t = EventTable(ControllerMetrics(), max_events=500, max_in_flight=10)
    last = ""
    for _ in range(5000):
        ev = t.create(common_pb2.PIN, instance_id="i")
        t.finish(ev.event_id, common_pb2.COMPLETED)
        last = ev.event_id
    assert len(t) == 500 and t.get(last).status == common_pb2.COMPLETED
    assert len(t._ended) == 500  # noqa: SLF001

