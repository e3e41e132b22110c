"""A registered worker belongs to the agent that registered it: takeover refused, calls without its
secret refused, progress checked against what the event asked for, Move only to registered workers.
Over real gRPC/HTTP, with a scripted agent where the test needs an agent that lies."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.instance_agent.keys import chunk_spans

from .harness import ControllerThread
from .scripted_agent import ScriptedAgent, chunk, final

LOC = "LocalCPUBackend"
CHUNK = 16


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.fixture
def c() -> Iterator[ControllerThread]:
    with ControllerThread() as ctl:
        yield ctl


def test_takeover_from_another_endpoint_is_refused_while_alive(c: ControllerThread) -> None:
    c.register("inst", 0, port=8001, heartbeat=0.2)
    with pytest.raises(grpc.RpcError) as err:
        c.register("inst", 0, port=6666, ip="127.0.0.1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "127.0.0.1:8001" in err.value.details() and "misses its heartbeats" in err.value.details()
    info = c.post("/query_worker_info", {"instance_id": "inst"}).body["worker_infos"][0]
    assert info["port"] == 8001
    # Once the first one misses its heartbeats (down after 3 x 0.2 s), another endpoint may take over.
    deadline = time.monotonic() + 10
    while c.post("/query_worker_info", {"instance_id": "inst"}).body["worker_infos"][0]["state"] != "down":
        assert time.monotonic() < deadline, "first registration never went down"
        time.sleep(0.05)
    c.register("inst", 0, port=6666)
    assert c.post("/query_worker_info", {"instance_id": "inst"}).body["worker_infos"][0]["port"] == 6666


def test_same_endpoint_may_register_again_and_a_renewal_keeps_the_secret(c: ControllerThread) -> None:
    first = c.register("inst", 0, port=8001).secret
    assert len(first) >= 24
    renewed = c.register("inst", 0, port=8001, secret=first).secret
    assert renewed == first
    # The same endpoint without the secret (the agent restarted in place) gets a new one; the old is void.
    fresh = c.register("inst", 0, port=8001).secret
    assert fresh != first
    assert code_of(lambda: c.stub.Heartbeat(pb.HeartbeatRequest(instance_id="inst", worker_id=0, secret=first),
                                            timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert c.heartbeat("inst", 0).registered


def test_calls_of_a_worker_need_its_secret(c: ControllerThread) -> None:
    c.register("inst", 0, port=8001, chunk_size=CHUNK)
    tokens = list(range(32))
    admits = [pb.KVEvent(type=pb.ADMIT, location=LOC, chunk_key=s.key, token_end=s.end)
              for s in chunk_spans(tokens, CHUNK)]
    for secret in ("", "not-the-secret"):
        hb = pb.HeartbeatRequest(instance_id="inst", worker_id=0, secret=secret)
        assert code_of(lambda: c.stub.Heartbeat(hb, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        wipe = pb.ReportKVEventsRequest(instance_id="inst", worker_id=0, full_resync=True, secret=secret)
        assert code_of(lambda: c.stub.ReportKVEvents(wipe, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        dereg = pb.DeregisterWorkerRequest(instance_id="inst", worker_id=0, secret=secret)
        assert code_of(lambda: c.stub.DeregisterWorker(dereg, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    # Nothing changed: still registered, and the right secret works.
    c.stub.ReportKVEvents(pb.ReportKVEventsRequest(instance_id="inst", worker_id=0, events=admits, full_resync=True,
                                                   secret=c.secret()), timeout=5)
    assert c.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"inst": [LOC, 32]}
    c.stub.DeregisterWorker(pb.DeregisterWorkerRequest(instance_id="inst", worker_id=0, secret=c.secret()), timeout=5)
    assert c.post("/query_worker_info", {"instance_id": "all"}).body["worker_infos"] == []


def forged(*messages: agent_pb2.ProgressResponse):  # noqa: ANN201
    async def script(request: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        for m in messages:
            yield m
    return script


N = CHUNK * 4  # the event asks for 4 chunks


@pytest.mark.parametrize(("messages", "needle"), [
    pytest.param([*(chunk(i, CHUNK, N) for i in range(4)), chunk(4, CHUNK, N), final(N, 5, 5)],
                 "outside the 4 chunks asked for", id="more-chunks-than-asked"),
    pytest.param([chunk(0, CHUNK, N), chunk(0, CHUNK, N)], "reported twice", id="same-chunk-twice"),
    pytest.param([chunk(0, CHUNK, N, before=10**15, after=1)], "outside 0..", id="absurd-bytes"),
    pytest.param([chunk(0, CHUNK, N, before=-5)], "outside 0..", id="negative-bytes"),
    pytest.param([chunk(0, CHUNK, N, before=1000, after=0)], "no bytes", id="ratio-from-nothing"),
    pytest.param([*(chunk(i, CHUNK, N) for i in range(4)), final(N * 1000, 1000, 1000)], "final",
                 id="final-claims-more"),
])
def test_forged_progress_is_refused(c: ControllerThread, messages: list[Any], needle: str) -> None:
    with ScriptedAgent(CHUNK) as agent:
        agent.script = forged(*messages)
        c.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        r = c.post("/compress", {"instance_id": "inst", "method": "lossless", "location": LOC,
                                 "tokens": list(range(N))})
        assert r.status == 200
        ev = c.wait_event(r.body["event_id"]).event
    assert ev.status == common_pb2.FAILED
    assert "impossible progress" in ev.error and needle in ev.error, ev.error
    assert ev.chunks_done <= 4 and ev.chunks_total <= 4
    # No absurd figure reached the event or the metrics.
    assert ev.bytes_before <= 4 * 1000 and (ev.compression_ratio == 0 or ev.compression_ratio == pytest.approx(4.0))
    assert c.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "kvmesh_compression_ratio", {"method": "lossless", "location": LOC}) is None


def test_honest_progress_is_accepted(c: ControllerThread) -> None:
    with ScriptedAgent(CHUNK) as agent:
        agent.script = forged(*(chunk(i, CHUNK, N) for i in range(4)), final(N, 4, 4))
        c.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        r = c.post("/compress", {"instance_id": "inst", "method": "lossless", "location": LOC,
                                 "tokens": list(range(N))})
        ev = c.wait_event(r.body["event_id"]).event
    assert ev.status == common_pb2.COMPLETED and ev.chunks_done == 4 and ev.compression_ratio == pytest.approx(4.0)


def test_move_targets_must_be_live_workers_of_the_named_instance(c: ControllerThread) -> None:
    c.register("src", 0, port=8001)
    body = {"old_position": ["src", LOC], "new_position": ["nowhere", LOC], "tokens": [1, 2, 3, 4]}
    r = c.post("/move", body)
    assert r.status == 404 and "'nowhere' is not registered" in r.body["error"]["message"]
    c.register("dst", 0, port=8002, heartbeat=0.1)
    deadline = time.monotonic() + 10
    while c.post("/query_worker_info", {"instance_id": "dst"}).body["worker_infos"][0]["state"] != "down":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = c.post("/move", {**body, "new_position": ["dst", LOC]})
    assert r.status == 409 and "down" in r.body["error"]["message"]


def test_workers_advertise_the_model_files_they_hold() -> None:
    """What an agent can decode travels with its registration (issue 14.3): query_worker_info shows it."""
    with ControllerThread() as c:
        c.register("files", 0, port=41001, model_files=("layer_predictor:abc123", "query_profile:def456"))
        c.register("files", 1, port=41002)
        infos = {w.worker_id: list(w.model_files) for w in c.stub.QueryWorkerInfo(
            pb.QueryWorkerInfoRequest(instance_id="files"), timeout=5).worker_infos}
        assert infos == {0: ["layer_predictor:abc123", "query_profile:def456"], 1: []}
        with pytest.raises(grpc.RpcError) as refused:
            c.register("files", 2, port=41003, model_files=("",))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model_files" in refused.value.details()
