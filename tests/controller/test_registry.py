"""Registration, heartbeats, liveness, worker queries and the lookup index, over real gRPC/HTTP."""
from __future__ import annotations

import time

import grpc
import pytest

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.instance_agent.keys import chunk_spans

from .harness import ControllerThread


def wait_until(predicate, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met before the deadline")


def admit(c: ControllerThread, tokens: list[int], chunk_size: int, *, instance: str = "inst", worker: int = 0,
          location: str = "LocalCPUBackend", upto: int | None = None, full_resync: bool = False) -> None:
    spans = chunk_spans(tokens, chunk_size)[:upto]
    c.stub.ReportKVEvents(pb.ReportKVEventsRequest(
        instance_id=instance, worker_id=worker, full_resync=full_resync, secret=c.secret(instance, worker),
        events=[pb.KVEvent(type=pb.ADMIT, location=location, chunk_key=s.key, token_end=s.end) for s in spans]),
        timeout=10)


def test_register_and_query_worker_info(controller: ControllerThread) -> None:
    resp = controller.register("inst", 0, port=8001, heartbeat=2.0)
    assert resp.worker_timeout_seconds == pytest.approx(6.0)  # three missed heartbeats
    controller.register("inst", 1, port=8002)
    controller.register("other", 0, port=8101, ip="127.0.0.2")
    r = controller.post("/query_worker_info", {"instance_id": "all", "worker_ids": None})
    assert r.status == 200 and r.body["event_id"]
    got = [(w["instance_id"], w["worker_id"], w["port"], w["state"]) for w in r.body["worker_infos"]]
    assert got == [("inst", 0, 8001, "up"), ("inst", 1, 8002, "up"), ("other", 0, 8101, "up")]
    info = r.body["worker_infos"][0]
    assert info["methods"] == ["lossless", "cachegen"] and info["chunk_size"] == 4
    assert info["registration_time"] > 0 and info["last_heartbeat_time"] >= info["registration_time"]
    r = controller.post("/query_worker_info", {"instance_id": "inst", "worker_ids": [1]})
    assert [w["worker_id"] for w in r.body["worker_infos"]] == [1]
    r = controller.post("/query_worker_info", {"instance_id": "inst", "worker_ids": [7]})
    assert r.status == 404 and "[7]" in r.body["error"]["message"]
    r = controller.post("/query_instance", {"ip": "127.0.0.2"})
    assert r.status == 200 and r.body["res"] == "other"


def test_register_rejects_bad_requests(controller: ControllerThread) -> None:
    with pytest.raises(grpc.RpcError) as err:
        controller.register("", 0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        controller.register("inst", 0, chunk_size=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        controller.stub.ReportKVEvents(pb.ReportKVEventsRequest(instance_id="nobody", worker_id=0), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_heartbeat_of_unknown_worker_asks_for_registration(controller: ControllerThread) -> None:
    assert controller.heartbeat("inst", 0).registered is False
    controller.register("inst", 0)
    assert controller.heartbeat("inst", 0).registered is True
    controller.stub.DeregisterWorker(pb.DeregisterWorkerRequest(instance_id="inst", worker_id=0,
                                                                secret=controller.secret("inst", 0)), timeout=5)
    assert controller.heartbeat("inst", 0).registered is False


def test_silent_worker_is_marked_down_then_up_again(controller: ControllerThread) -> None:
    controller.register("inst", 0, heartbeat=0.1)  # down after 0.3 s of silence

    def state() -> str:
        return controller.post("/query_worker_info", {"instance_id": "inst"}).body["worker_infos"][0]["state"]
    wait_until(lambda: state() == "down")
    r = controller.post("/health", {"instance_id": "inst"})
    assert r.body["healthy"] is False and r.body["error_codes"] == {"0": -1004}
    assert "missed heartbeats" in r.body["errors"]["0"]
    r = controller.post("/compress", {"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend",
                                      "tokens": [1]})
    assert r.status == 409 and "down" in r.body["error"]["message"]
    assert controller.heartbeat("inst", 0).registered
    assert state() == "up"


def test_long_silent_worker_is_dropped() -> None:
    with ControllerThread(worker_timeout=0.3) as c:
        c.register("inst", 0)
        wait_until(lambda: c.post("/query_worker_info", {"instance_id": "all"}).body["worker_infos"] == [])
        assert c.heartbeat("inst", 0).registered is False


def test_lookup_answers_from_reported_chunks(controller: ControllerThread) -> None:
    tokens = list(range(100, 112))  # 3 chunks of 4
    controller.register("inst", 0, chunk_size=4)
    controller.register("other", 0, chunk_size=4, ip="127.0.0.2")
    admit(controller, tokens, 4)                       # the whole prefix
    admit(controller, tokens, 4, instance="other", upto=2)  # 8 tokens
    r = controller.post("/lookup", {"tokens": tokens})
    assert r.status == 200
    assert r.body["layout_info"] == {"inst": ["LocalCPUBackend", 12], "other": ["LocalCPUBackend", 8]}
    assert [(m["instance_id"], m["num_tokens"]) for m in r.body["matches"]] == [("inst", 12), ("other", 8)]
    # A different first chunk shares no key: prefix-chained hashing.
    assert controller.post("/lookup", {"tokens": [0, *tokens[1:]]}).body["layout_info"] == {}
    # A partial last chunk counts only when stored as such.
    assert controller.post("/lookup", {"tokens": tokens[:6]}).body["layout_info"] == {
        "inst": ["LocalCPUBackend", 4], "other": ["LocalCPUBackend", 4]}
    # Evictions take chunks out; a full resync replaces the index.
    evicted = chunk_spans(tokens, 4)[1]
    controller.stub.ReportKVEvents(pb.ReportKVEventsRequest(instance_id="inst", worker_id=0,
                                                            secret=controller.secret("inst", 0), events=[
        pb.KVEvent(type=pb.EVICT, location="LocalCPUBackend", chunk_key=evicted.key, token_end=evicted.end)]), timeout=5)
    assert controller.post("/lookup", {"tokens": tokens}).body["layout_info"]["inst"] == ["LocalCPUBackend", 4]
    admit(controller, tokens, 4, upto=1, full_resync=True)
    admit(controller, tokens, 4, instance="other", upto=0, full_resync=True)
    assert controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"inst": ["LocalCPUBackend", 4]}


def test_lookup_of_multi_worker_instance_needs_every_rank(controller: ControllerThread) -> None:
    tokens = list(range(8))
    controller.register("tp", 0, chunk_size=4)
    controller.register("tp", 1, chunk_size=4)
    admit(controller, tokens, 4, instance="tp", worker=0)
    admit(controller, tokens, 4, instance="tp", worker=1, upto=1)
    assert controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"tp": ["LocalCPUBackend", 4]}


def test_reregistration_keeps_index_until_resync(controller: ControllerThread) -> None:
    tokens = list(range(8))
    controller.register("inst", 0, chunk_size=4, port=8001)
    admit(controller, tokens, 4)
    controller.register("inst", 0, chunk_size=4, port=8001)
    assert controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"inst": ["LocalCPUBackend", 8]}
    # A different agent address (the agent, holding its secret, moved) starts from an empty index.
    controller.register("inst", 0, chunk_size=4, port=8002, secret=controller.secret("inst", 0))
    assert controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {}
