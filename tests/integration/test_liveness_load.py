"""No live worker is marked down by load: heartbeats are served on the controller's heartbeat server (a
thread and event loop of its own), so a flood of admissions that keeps the main loop busy cannot delay
them, while a worker that really stops beating is still marked down."""
from __future__ import annotations

import collections
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.controller.registry import UP
from kvmesh.core.channels import channel
from kvmesh.instance_agent.agent import EmbeddedAgent
from kvmesh.instance_agent.config import config_from_dict
from tests.controller.harness import ControllerThread

from .conftest import LOCATION, AgentClient, agent_config, make_kv, method_under_test, wait_registered, wait_until

HEARTBEAT = 0.2  # down after 3 x 0.2 s of silence
# The flood: with heartbeats served on the main loop (--heartbeat-port -1) these settings turned the
# worker down in every run tried (72-166 answers 409 "workers down" of ~550; a call on the main gRPC
# port took 1.3-2.5 s meanwhile); on the heartbeat server, none.
FLOOD_HEARTBEAT = 0.1  # down after 0.3 s of silence
FLOOD_S = 4.0  # 40 heartbeat intervals
CLIENTS = 32
MAX_IN_FLIGHT = 300
TOKENS = 1024


Starter = Callable[..., tuple[ControllerThread, Callable[..., tuple[EmbeddedAgent, AgentClient]]]]


@pytest.fixture
def start_agent_with() -> Iterator[Starter]:
    """A controller with the given settings, and a starter of in-process agents registered with it."""
    controllers: list[ControllerThread] = []
    started: list[tuple[EmbeddedAgent, AgentClient]] = []

    def start_controller(**settings: Any) -> tuple[ControllerThread, Callable[..., tuple[EmbeddedAgent, AgentClient]]]:
        c = ControllerThread(**settings)
        c.start()
        controllers.append(c)

        def start(instance_id: str, *, heartbeat: float, chunk_size: int = 64) -> tuple[EmbeddedAgent, AgentClient]:
            cfg = config_from_dict(agent_config(c.grpc_target, instance_id, chunk_size=chunk_size,
                                                heartbeat=heartbeat), env={})
            agent = EmbeddedAgent(cfg, worker_id=0, metrics_port=-1)
            agent.start()
            client = AgentClient(f"127.0.0.1:{agent.grpc_port}")
            started.append((agent, client))
            wait_registered(c, instance_id)
            return agent, client
        return c, start

    yield start_controller
    for agent, client in reversed(started):
        client.close()
        agent.stop()
    for c in controllers:
        c.stop()


def flood(port: int, body: dict[str, object], seconds: float, clients: int,
          limit_s: float = 60.0) -> collections.Counter[str]:
    """``clients`` threads POST /compress back to back for at least ``seconds`` and until --max-in-flight
    is reached (a 429 came; at most ``limit_s``): every answer's status (with the start of its body
    when it is neither 200 nor 429)."""
    answers: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    data = json.dumps(body).encode()
    start = time.monotonic()

    def done() -> bool:
        elapsed = time.monotonic() - start
        with lock:
            return elapsed >= limit_s or (elapsed >= seconds and answers["429"] > 0)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while not done():
                conn.request("POST", "/compress", body=data, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                text = resp.read()
                key = str(resp.status) if resp.status in (200, 429) else f"{resp.status} {text[:200]!r}"
                with lock:
                    answers[key] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit_s + 60)
    return answers


def test_a_flood_of_admissions_never_turns_a_live_worker_down(start_agent_with: Starter) -> None:
    """Admissions up to --max-in-flight, their agent streams and the HTTP gateway keep the controller's
    main loop busy (not stalled) for 40 heartbeat intervals: the worker stays up throughout (no sweep
    ever marked it down) and the flood's answers are 200 or 429, never 409 "workers down"."""
    controller, start_agent = start_agent_with(max_in_flight=MAX_IN_FLIGHT, health_check_interval=0.05,
                                               max_tokens=100_000)
    agent, client = start_agent("flooded", heartbeat=FLOOD_HEARTBEAT)
    server = controller.server
    assert server.heartbeat_port > 0
    wait_until(lambda: agent.agent._link.beat_target.endswith(f":{server.heartbeat_port}"),  # noqa: SLF001
               timeout=10, what="the agent beats at the heartbeat server")
    tokens = list(range(TOKENS))
    client.put(tokens, make_kv(TOKENS, layers=4, channels=64))
    wait_until(lambda: controller.post("/lookup", {"tokens": tokens}).body.get("layout_info", {}).get("flooded"),
               timeout=10, what="the index holds the tokens")
    down = lambda: server.metrics.registry.get_sample_value("kvmesh_workers_marked_down_total")  # noqa: E731
    assert down() == 0
    body = {"instance_id": "flooded", "method": method_under_test(), "location": LOCATION, "tokens": tokens}
    answers = flood(controller.http_port, body, FLOOD_S, CLIENTS)
    assert set(answers) <= {"200", "429"}, answers  # never 409 "workers down", never 5xx
    assert answers["429"] > 0, f"the flood never reached --max-in-flight ({MAX_IN_FLIGHT}): {answers}"
    assert down() == 0, "a live worker was marked down under load"
    assert server.service.registry.counts()["down"] == 0


def test_a_worker_that_stops_beating_is_marked_down_with_the_heartbeat_server() -> None:
    """Heartbeats on their own server do not switch liveness off: silence still turns a worker down,
    and a beat at the heartbeat port brings it back."""
    with ControllerThread(health_check_interval=0.05) as c:
        assert c.server is not None
        resp = c.register("quiet", 0, heartbeat=HEARTBEAT)
        assert resp.heartbeat_port == c.server.heartbeat_port > 0
        state = lambda: c.post("/query_worker_info", {"instance_id": "quiet"}).body["worker_infos"][0]["state"]  # noqa: E731
        with channel(f"127.0.0.1:{resp.heartbeat_port}") as ch:
            beats = controller_pb2_grpc.ControllerStub(ch)
            beat = lambda: beats.Heartbeat(pb.HeartbeatRequest(  # noqa: E731
                instance_id="quiet", worker_id=0, secret=resp.secret), timeout=5)
            for _ in range(10):  # beating at the heartbeat port keeps it up
                assert beat().registered
                assert state() == UP
                time.sleep(HEARTBEAT / 2)
            wait_until(lambda: state() == "down", timeout=10, what="silent worker marked down")
            assert beat().registered
            assert state() == UP
            # The heartbeat server serves Heartbeat alone.
            with pytest.raises(grpc.RpcError) as err:
                beats.Compress(pb.CompressRequest(instance_id="quiet"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_heartbeat_server_needs_the_token() -> None:
    """The same token as every other gRPC service; the health service stays open to probes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvmesh.core.security import SecuritySettings

    token = "heartbeat-token-0123456789abcdef"
    with ControllerThread(security=SecuritySettings(token=token)) as c:
        assert c.server is not None
        resp = c.register("tok", 0, heartbeat=1.0)
        target = f"127.0.0.1:{resp.heartbeat_port}"
        request = pb.HeartbeatRequest(instance_id="tok", worker_id=0, secret=resp.secret)
        with grpc.insecure_channel(target) as bare:
            with pytest.raises(grpc.RpcError) as err:
                controller_pb2_grpc.ControllerStub(bare).Heartbeat(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with channel(target, SecuritySettings(token=token)) as ch:
            assert controller_pb2_grpc.ControllerStub(ch).Heartbeat(request, timeout=5).registered


def test_no_heartbeat_server_when_asked_for_none() -> None:
    """--heartbeat-port -1: none is advertised, and heartbeats at the main port keep a worker up."""
    with ControllerThread(heartbeat_port=-1, health_check_interval=0.05) as c:
        assert c.server is not None and c.server.heartbeat_port == 0
        assert c.register("main", 0, heartbeat=HEARTBEAT).heartbeat_port == 0
        for _ in range(10):
            assert c.heartbeat("main", 0).registered
            time.sleep(HEARTBEAT / 2)
        assert c.post("/query_worker_info", {"instance_id": "main"}).body["worker_infos"][0]["state"] == UP


def test_heartbeat_target() -> None:
    from kvmesh.instance_agent.controller_link import heartbeat_target

    assert heartbeat_target("10.0.0.5:9001", 41234) == "10.0.0.5:41234"
    assert heartbeat_target("[::1]:9001", 41234) == "[::1]:41234"
    assert heartbeat_target("dns:///ctl.example:9001", 7) == "dns:///ctl.example:7"
    assert heartbeat_target("10.0.0.5:9001", 0) == "10.0.0.5:9001"  # an older controller: the main address
    assert heartbeat_target("ctl.example", 41234) == "ctl.example"  # no port to replace


def test_an_agent_falls_back_to_the_main_address(start_agent_with: Starter) -> None:
    """A heartbeat port the agent cannot reach (a firewall; here: that server stopped) is not a
    controller that is gone: the agent beats at the main address and stays up, registered once."""
    controller, start_agent = start_agent_with(health_check_interval=0.05)
    agent, _client = start_agent("fallback", heartbeat=HEARTBEAT)
    server = controller.server
    assert server is not None
    link = agent.agent._link  # noqa: SLF001
    main = controller.grpc_target
    wait_until(lambda: link.registrations == 1 and link.beat_target == f"127.0.0.1:{server.heartbeat_port}",
               timeout=10, what="the agent registered, beating at the heartbeat server")
    controller.call(server._heartbeats.stop())  # noqa: SLF001
    wait_until(lambda: link.beat_target == main, timeout=10, what="the agent beats at the main address")
    time.sleep(5 * HEARTBEAT)  # over the 0.6 s after which a silent worker is down
    assert server.metrics.registry.get_sample_value("kvmesh_workers_marked_down_total") == 0
    assert server.service.registry.counts() == {"up": 1, "down": 0}
    assert link.registrations == 1


def test_an_agent_falls_back_when_the_heartbeat_port_drops_calls(start_agent_with: Starter) -> None:
    """A heartbeat port that swallows calls (a Service that does not forward it) gives deadlines, not
    refusals: the agent falls back to the main address as well, and stays up."""
    import socket

    with socket.socket() as hole:  # accepts connections (the kernel's backlog) and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        controller, start_agent = start_agent_with(health_check_interval=0.05)
        server = controller.server
        assert server is not None
        server.service.heartbeat_port = hole.getsockname()[1]  # what registrations advertise from now on
        agent, _client = start_agent("dropped", heartbeat=1.0)  # down after 3 s of silence
        link = agent.agent._link  # noqa: SLF001
        wait_until(lambda: link.beat_target == controller.grpc_target, timeout=15,
                   what="the agent beats at the main address")
        time.sleep(1.5)  # more beats at the main address
        assert server.metrics.registry.get_sample_value("kvmesh_workers_marked_down_total") == 0
        assert server.service.registry.counts() == {"up": 1, "down": 0}
        assert link.registrations == 1
