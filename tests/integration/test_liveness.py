"""Liveness that load cannot fool: while the controller's event loop is blocked for longer than a
worker's timeout, a live agent is never marked down, and its agent keeps its registration."""
from __future__ import annotations

import time

from kvmesh.controller.registry import DOWN, UP, Registry
from tests.controller.harness import ControllerThread

from .conftest import wait_until

HEARTBEAT = 0.2  # down after 3 x 0.2 s of silence


def test_a_blocked_loop_does_not_turn_a_live_worker_down(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    agent, _client = start_agent("steady", heartbeat=HEARTBEAT)
    service = controller.server.service  # type: ignore[union-attr]
    # Registered, and its index resent: the link is done registering.
    wait_until(lambda: agent.agent.controller_connected, timeout=10, what="agent connected")
    registrations = agent.agent._link.registrations  # noqa: SLF001
    state = lambda: controller.sync(lambda: service.registry.get("steady", 0).state)  # noqa: E731
    wait_until(lambda: state() == UP, timeout=10, what="worker up")
    # Block the controller's loop (as a huge request parsed on it would) for 2.5 s, over 4 timeouts.
    controller.sync(time.sleep, 2.5)
    assert state() == UP
    lag = controller.server.metrics.registry.get_sample_value("kvmesh_loop_lag_seconds")  # type: ignore[union-attr]
    assert lag is not None and lag > 1.5, lag
    # The sweeps after the stall, once heartbeats flow again, keep it up; nothing was failed or redone.
    time.sleep(1.0)
    assert state() == UP
    assert controller.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "kvmesh_workers", {"state": "down"}) == 0
    assert agent.agent._link.registrations == registrations  # noqa: SLF001 - a late controller is not a gone one
    assert agent.agent.controller_connected


def test_a_worker_that_really_stops_is_still_marked_down() -> None:
    with ControllerThread(health_check_interval=0.05) as c:
        c.register("quiet", 0, heartbeat=HEARTBEAT)
        wait_until(lambda: c.post("/query_worker_info", {"instance_id": "quiet"}).body["worker_infos"][0]["state"]
                   == "down", timeout=10, what="silent worker marked down")


def test_stall_credit_is_not_silence() -> None:
    reg = Registry(worker_timeout=60, missed_heartbeats=3)
    a = reg.register(instance_id="i", worker_id=0, ip="127.0.0.1", port=1, peer_init_url="", methods=[],
                     locations=[], chunk_size=16, heartbeat_interval=0.1)
    now = a.seen_mono + 5.0
    reg.credit_stall(4.9)  # the controller itself stalled for all but 0.1 s of those 5 s
    assert reg.sweep(now_mono=now) == ([], []) and a.state == UP
    assert reg.sweep(now_mono=now + 1.0)[0] == [a] and a.state == DOWN


def test_an_agent_with_a_busy_loop_stays_up(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    """The agent's own event loop blocked (hundreds of streams, a big tensor converted) for over four
    of its timeouts: its heartbeats go out from a thread of their own, so it is not marked down."""
    agent, _client = start_agent("busy", heartbeat=HEARTBEAT)
    service = controller.server.service  # type: ignore[union-attr]
    wait_until(lambda: agent.agent.controller_connected, timeout=10, what="agent connected")
    state = lambda: controller.sync(lambda: service.registry.get("busy", 0).state)  # noqa: E731
    wait_until(lambda: state() == UP, timeout=10, what="worker up")
    blocked = agent._loop.call_soon_threadsafe(time.sleep, 2.5)  # noqa: SLF001 - the agent's loop, from outside
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert state() == UP, "a live agent with a busy loop was marked down"
        time.sleep(0.1)
    del blocked
    assert controller.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "kvmesh_workers", {"state": "down"}) == 0
