"""The registry and its lookup index are bounded and validated: chunk sizes in range, KV reports
capped and checked, the index capped per worker (partial, never unbounded), lookups hashing only
what they need."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.controller.registry import Registry, SpanKeys
from kvmesh.instance_agent.keys import chunk_spans

from .harness import ControllerThread

LOC = "LocalCPUBackend"


@pytest.fixture
def c() -> Iterator[ControllerThread]:
    # The production range of chunk sizes (the harness allows 4 for the other tests' small chunks).
    with ControllerThread(min_chunk_size=16, max_kv_events_per_report=100, max_index_entries_per_worker=10) as ctl:
        yield ctl


def admits(tokens: list[int], chunk_size: int) -> list[pb.KVEvent]:
    return [pb.KVEvent(type=pb.ADMIT, location=LOC, chunk_key=s.key, token_end=s.end)
            for s in chunk_spans(tokens, chunk_size)]


def report(c: ControllerThread, events: list[pb.KVEvent], full_resync: bool = False,
           more: bool = False) -> pb.ReportKVEventsResponse:
    return c.stub.ReportKVEvents(pb.ReportKVEventsRequest(instance_id="inst", worker_id=0, events=events,
                                                          full_resync=full_resync, more=more, secret=c.secret()),
                                 timeout=10)


@pytest.mark.parametrize("size", [0, 1, 15, 65537, -3])
def test_chunk_size_out_of_range_is_refused(c: ControllerThread, size: int) -> None:
    with pytest.raises(grpc.RpcError) as err:
        c.register("inst", 0, chunk_size=size)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk_size must be in 16..65536" in err.value.details() and str(size) in err.value.details()
    assert c.post("/query_worker_info", {"instance_id": "all"}).body["worker_infos"] == []


def test_report_over_the_per_report_cap_is_refused_whole(c: ControllerThread) -> None:
    c.register("inst", 0, chunk_size=16)
    with pytest.raises(grpc.RpcError) as err:
        report(c, admits(list(range(16 * 101)), 16))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "101 KV events" in err.value.details()
    assert c.post("/lookup", {"tokens": list(range(16))}).body["layout_info"] == {}


@pytest.mark.parametrize(("event", "needle"), [
    (pb.KVEvent(type=pb.ADMIT, location="Elsewhere", chunk_key="0" * 32, token_end=16), "not one this worker"),
    (pb.KVEvent(type=pb.ADMIT, location=LOC, chunk_key="xyz", token_end=16), "hex digits"),
    (pb.KVEvent(type=pb.ADMIT, location=LOC, chunk_key="a" * 5000, token_end=16), "hex digits"),
    (pb.KVEvent(type=pb.ADMIT, location=LOC, chunk_key="0" * 32, token_end=-1), "token_end"),
    (pb.KVEvent(type=pb.KV_EVENT_TYPE_UNSPECIFIED, location=LOC, chunk_key="0" * 32, token_end=16), "neither"),
])
def test_bad_kv_events_are_refused_and_nothing_applied(c: ControllerThread, event: pb.KVEvent, needle: str) -> None:
    c.register("inst", 0, chunk_size=16)
    tokens = list(range(32))
    with pytest.raises(grpc.RpcError) as err:
        report(c, [*admits(tokens, 16), event])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    assert c.post("/lookup", {"tokens": tokens}).body["layout_info"] == {}


def test_index_is_capped_per_worker_and_then_partial(c: ControllerThread) -> None:
    c.register("inst", 0, chunk_size=16)
    tokens = list(range(16 * 30))
    report(c, admits(tokens, 16)[:8], full_resync=True)
    service = c.server.service  # type: ignore[union-attr]
    assert c.sync(lambda: service.registry.get("inst", 0).index_complete)
    report(c, admits(tokens, 16)[8:30])  # 30 chunks over a cap of 10
    worker = c.sync(lambda: service.registry.get("inst", 0))
    assert worker.index_entries == 10 and worker.truncated and not worker.index_complete
    assert c.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"inst": [LOC, 160]}
    # Evictions make room; a new full resync makes it authoritative again.
    report(c, admits(tokens, 16)[:2], full_resync=True)
    assert c.sync(lambda: (service.registry.get("inst", 0).index_entries,
                           service.registry.get("inst", 0).index_complete)) == (2, True)


def test_batched_full_resync_is_complete_only_at_its_end(c: ControllerThread) -> None:
    c.register("inst", 0, chunk_size=16)
    tokens = list(range(16 * 6))
    events = admits(tokens, 16)
    service = c.server.service  # type: ignore[union-attr]
    report(c, events[:3], full_resync=True, more=True)
    assert not c.sync(lambda: service.registry.get("inst", 0).index_complete)
    report(c, events[3:], more=False)
    assert c.sync(lambda: service.registry.get("inst", 0).index_complete)
    assert c.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"inst": [LOC, 96]}


def test_lookup_hashes_only_as_deep_as_the_longest_match() -> None:
    reg = Registry(min_chunk_size=16)
    tokens = list(range(16 * 10_000))
    for wid in range(8):
        w = reg.register(instance_id="inst", worker_id=wid, ip="127.0.0.1", port=9000 + wid, peer_init_url="",
                         methods=["lossless"], locations=[LOC], chunk_size=16, heartbeat_interval=1.0)
        reg.report_kv_events("inst", wid, [(1, LOC, s.key, s.end) for s in chunk_spans(tokens, 16)[:3]], True,
                             secret=w.secret)
    keys = SpanKeys(tokens)
    assert reg.lookup(keys) == [("inst", LOC, 48)]
    # Eight workers, one chunk size: four chunks hashed (three matched, the fourth missed), not 8 x 10,000.
    spans, _ = keys._by_size[16]  # noqa: SLF001
    assert len(spans) == 4


def test_registrations_are_bounded() -> None:
    with ControllerThread(max_workers=2) as c:
        c.register("a", 0)
        c.register("a", 1)
        c.register("a", 1)  # the same worker again: not a new one
        with pytest.raises(grpc.RpcError) as err:
            c.register("b", 0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-workers" in err.value.details()
        for kwargs, needle in (({"instance_id": "x" * 300}, "instance_id is 300"),
                               ({"methods": ("m",) * 65}, "methods must be"),
                               ({"locations": ("",)}, "locations must be")):
            with pytest.raises(grpc.RpcError) as err:
                c.register(**{"instance_id": "a", "worker_id": 0, **kwargs})  # type: ignore[arg-type]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
