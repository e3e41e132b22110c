"""Instances with several workers (ranks) and moves between instances."""
from __future__ import annotations

import torch

from tests.controller.harness import ControllerThread

from .conftest import LOCATION, make_kv, method_under_test, wait_until


def test_fan_out_to_every_worker(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    method = method_under_test()
    _, c0 = start_agent("tp", 0, chunk_size=8)
    _, c1 = start_agent("tp", 1, chunk_size=8)
    tokens = list(range(20))
    # Each rank holds its own shard of the KV (here: different values).
    c0.put(tokens, make_kv(20, layers=2, channels=32, seed=10))
    c1.put(tokens, make_kv(20, layers=2, channels=32, seed=11))
    r = controller.post("/compress", {"instance_id": "tp", "method": method, "location": LOCATION, "tokens": tokens})
    assert r.status == 200 and r.body["num_tokens"] == 20
    ev = controller.wait_event(r.body["event_id"]).event
    assert ev.status == 3, ev.error
    assert ev.chunks_total == ev.chunks_done == 6
    assert [(w.worker_id, w.status, w.chunks_done) for w in ev.workers] == [(0, 3, 3), (1, 3, 3)]
    assert c0.location_stats().num_encoded == 3 and c1.location_stats().num_encoded == 3
    health = controller.post("/health", {"instance_id": "tp"}).body
    assert health["error_codes"] == {"0": 0, "1": 0} and health["healthy"] is True


def test_worker_disagreement_is_an_event_error(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    method = method_under_test()
    _, c0 = start_agent("tp", 0, chunk_size=8)
    _, c1 = start_agent("tp", 1, chunk_size=8)
    tokens = list(range(24))
    c0.put(tokens, make_kv(24, layers=2, channels=32, seed=12))
    c1.put(tokens[:8], make_kv(8, layers=2, channels=32, seed=13))  # rank 1 lost two chunks
    r = controller.post("/compress", {"instance_id": "tp", "method": method, "location": LOCATION, "tokens": tokens})
    assert r.status == 200
    assert r.body["num_tokens"] == 8  # what every rank holds
    ev = controller.wait_event(r.body["event_id"]).event
    assert ev.status == 4  # FAILED, with both ranks' work reported
    assert "disagree" in ev.error and "worker 0 holds 24" in ev.error and "worker 1 holds 8" in ev.error
    assert {w.worker_id: w.chunks_done for w in ev.workers} == {0: 3, 1: 1}


def test_move_between_instances(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    _, src = start_agent("a", chunk_size=8)
    _, dst = start_agent("b", chunk_size=8)
    tokens = list(range(300, 320))
    kv = make_kv(20, layers=2, channels=32, seed=14)
    src.put(tokens, kv)
    body = {"old_position": ["a", LOCATION], "new_position": ["b", LOCATION], "tokens": tokens, "copy": False}
    r = controller.post("/move", body)
    assert r.status == 200 and r.body["num_tokens"] == 20 and r.body["event_id"].startswith("Move")
    ev = controller.wait_event(r.body["event_id"]).event
    assert ev.status == 3, ev.error
    assert ev.target_instance_id == "b" and ev.chunks_done == 3
    n, got = dst.get(tokens)
    assert n == 20 and torch.equal(got, kv)
    assert src.get(tokens)[0] == 0
    wait_until(lambda: controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"b": [LOCATION, 20]},
               what="lookup index follows the move")
