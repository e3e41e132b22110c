"""Agents that die or stall mid-event: the event FAILS with a clear error, the controller stays healthy,
and no stored chunk is lost."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.instance_agent.agent import EmbeddedAgent
from kvmesh.instance_agent.config import config_from_dict
from tests.controller.harness import ControllerThread
from tests.support import console_script, running, wait_grpc_healthy

from .conftest import (LOCATION, AgentClient, agent_config, make_kv, method_under_test, wait_registered, wait_until,
                       write_agent_yaml)

CHUNK = 8
NUM_TOKENS = 320  # 40 chunks: long enough to act while the event runs


def start_agent_process(tmp_path: Path, c: ControllerThread, instance_id: str, heartbeat: float):  # noqa: ANN201
    cfg = tmp_path / f"{instance_id}.yaml"
    (port,) = write_agent_yaml(cfg, c.grpc_target, instance_id, chunk_size=CHUNK, heartbeat=heartbeat)
    args = [console_script("kvmesh-agent"), "--config", str(cfg), "--metrics-port", "0", "--host", "127.0.0.1"]
    return running(args, log=tmp_path / f"{instance_id}.log"), port


def compress_and_act_mid_event(c: ControllerThread, instance_id: str, act) -> pb.WatchEventResponse:  # noqa: ANN001
    tokens = list(range(NUM_TOKENS))
    r = c.post("/compress", {"instance_id": instance_id, "method": method_under_test(), "location": LOCATION,
                             "tokens": tokens})
    assert r.status == 200 and r.body["num_tokens"] == NUM_TOKENS, r.body
    acted = False
    last = None
    for update in c.stub.WatchEvent(pb.WatchEventRequest(event_id=r.body["event_id"]), timeout=120):
        last = update
        if not acted and update.event.chunks_done >= 1:
            act()
            acted = True
    assert acted and last is not None
    # The event ended while chunks were still to do: it really was mid-event.
    assert last.event.chunks_done < last.event.chunks_total
    return last


def test_agent_killed_mid_event(tmp_path: Path, controller: ControllerThread) -> None:
    ctx, port = start_agent_process(tmp_path, controller, "victim", heartbeat=1.0)
    with ctx as proc:
        wait_grpc_healthy(f"127.0.0.1:{port}", timeout=120)
        wait_registered(controller, "victim")
        client = AgentClient(f"127.0.0.1:{port}")
        client.put(list(range(NUM_TOKENS)), make_kv(NUM_TOKENS, layers=8, channels=128, seed=20))
        client.close()
        final = compress_and_act_mid_event(controller, "victim", lambda: os.killpg(proc.pid, signal.SIGKILL))
        proc.wait(timeout=30)
    ev = final.event
    assert ev.status == 4  # FAILED
    assert "worker 0 of instance 'victim'" in ev.error
    assert "broke mid-event" in ev.error or "missed its heartbeats" in ev.error, ev.error
    assert ev.workers[0].status == 4 and ev.workers[0].error
    # The controller is healthy and answers.
    wait_grpc_healthy(controller.grpc_target, timeout=10)
    assert controller.post("/lookup", {"tokens": [1, 2, 3]}).status == 200
    health = controller.post("/health", {"instance_id": "victim"}).body
    assert health["healthy"] is False and health["error_codes"]["0"] in (-1001, -1004)
    # Within three heartbeats it is marked down.
    wait_until(lambda: controller.post("/health", {"instance_id": "victim"}).body["error_codes"]["0"] == -1004,
               timeout=30, what="dead worker marked down")
    # The CLI reports the failed event with a non-zero exit.
    cli = subprocess.run([console_script("kvmesh"), "--controller", controller.grpc_target, "watch", ev.event_id,
                          "--quiet"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and '"status": "FAILED"' in cli.stdout


def test_stalled_agent_is_marked_down_and_loses_nothing(tmp_path: Path, controller: ControllerThread) -> None:
    ctx, port = start_agent_process(tmp_path, controller, "sleepy", heartbeat=0.5)
    tokens = list(range(NUM_TOKENS))
    with ctx as proc:
        wait_grpc_healthy(f"127.0.0.1:{port}", timeout=120)
        wait_registered(controller, "sleepy")
        client = AgentClient(f"127.0.0.1:{port}")
        kv = make_kv(NUM_TOKENS, layers=8, channels=128, seed=21)
        client.put(tokens, kv)
        try:
            final = compress_and_act_mid_event(controller, "sleepy", lambda: os.killpg(proc.pid, signal.SIGSTOP))
            ev = final.event
            assert ev.status == 4
            assert "missed its heartbeats" in ev.error and "marked down" in ev.error, ev.error
            info = controller.post("/query_worker_info", {"instance_id": "sleepy"}).body["worker_infos"][0]
            assert info["state"] == "down"
            r = controller.post("/compress", {"instance_id": "sleepy", "method": method_under_test(),
                                              "location": LOCATION, "tokens": tokens})
            assert r.status == 409 and "down" in r.body["error"]["message"]
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        # Heartbeats resume: the worker is up again, and every chunk is still there and readable.
        wait_until(lambda: controller.post("/query_worker_info", {"instance_id": "sleepy"}).body["worker_infos"][0]
                   ["state"] == "up", timeout=30, what="worker up again")
        n, got = client.get(tokens)
        assert n == NUM_TOKENS and got is not None and got.shape == kv.shape
        client.close()
    assert proc.returncode is not None


def test_unreachable_agent_is_reported_by_health(controller: ControllerThread) -> None:
    # A worker registered at an address where nothing answers: health answers (-1001), it does not hang.
    controller.register("ghost", 0, port=9, ip="127.0.0.1")
    with grpc.insecure_channel(controller.grpc_target) as ch:
        resp = controller_pb2_grpc.ControllerStub(ch).Health(pb.HealthRequest(instance_id="ghost"), timeout=60)
    assert resp.error_codes[0] == -1001 and not resp.healthy


def test_controller_shutdown_cancels_in_flight_events() -> None:
    # Its own controller, stopped mid-event.
    with ControllerThread() as c:
        agent = EmbeddedAgent(config_from_dict(agent_config(c.grpc_target, "brief", chunk_size=CHUNK), env={}),
                              worker_id=0, metrics_port=-1)
        agent.start()
        try:
            wait_registered(c, "brief")
            client = AgentClient(f"127.0.0.1:{agent.grpc_port}")
            tokens = list(range(NUM_TOKENS))
            client.put(tokens, make_kv(NUM_TOKENS, layers=8, channels=128, seed=22))
            r = c.post("/compress", {"instance_id": "brief", "method": method_under_test(), "location": LOCATION,
                                     "tokens": tokens})
            service = c.server.service
            for update in c.stub.WatchEvent(pb.WatchEventRequest(event_id=r.body["event_id"]), timeout=60):
                if update.event.chunks_done >= 1:
                    break
            c.stop()  # returns: nothing waits on the agent's stream
            ev = service.events.get(r.body["event_id"])
            assert ev.status == 5 and "shut down" in ev.error  # CANCELLED
            # The agent keeps every chunk, whatever form each one reached.
            n, got = client.get(tokens)
            assert n == NUM_TOKENS and got is not None
            client.close()
        finally:
            agent.stop()
