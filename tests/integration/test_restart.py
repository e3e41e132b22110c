"""A controller restarted (a crash: SIGKILL): agents re-register by themselves, resend their index,
and operations work again."""
from __future__ import annotations

import http.client
import json
import signal
from pathlib import Path
from typing import Any

from kvmesh.instance_agent.agent import EmbeddedAgent
from kvmesh.instance_agent.config import config_from_dict
from tests.support import console_script, free_port, running, wait_grpc_healthy, wait_http_ok

from .conftest import LOCATION, AgentClient, agent_config, make_kv, method_under_test, wait_until


def post(port: int, path: str, body: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def watch_status(port: int, event_id: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", f"/events/{event_id}/watch")
        lines = [json.loads(line) for line in conn.getresponse().read().splitlines() if line.strip()]
        return lines[-1]["event"]["status"]
    finally:
        conn.close()


def test_controller_restart(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    args = [console_script("kvmesh-controller"), "--host", "127.0.0.1", "--port", str(http_port),
            "--monitor-port", str(grpc_port), "--health-check-interval", "0.2"]
    tokens = list(range(900, 940))
    cfg = config_from_dict(agent_config(f"127.0.0.1:{grpc_port}", "phoenix", chunk_size=16, heartbeat=0.5), env={})

    def held() -> Any:
        return post(http_port, "/lookup", {"tokens": tokens})[1]["layout_info"] == {"phoenix": [LOCATION, 40]}

    with running(args, log=tmp_path / "controller-1.log") as first:
        wait_grpc_healthy(f"127.0.0.1:{grpc_port}", timeout=60)
        agent = EmbeddedAgent(cfg, worker_id=0, metrics_port=-1)
        agent.start()
        try:
            client = AgentClient(f"127.0.0.1:{agent.grpc_port}")
            client.put(tokens, make_kv(40, layers=2, channels=32, seed=30))
            wait_until(held, timeout=30, what="lookup index fed by the agent")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)

            with running(args, log=tmp_path / "controller-2.log") as second:
                wait_http_ok(f"http://127.0.0.1:{http_port}/metrics", timeout=60, proc=second)
                # Nothing told the agent: its next heartbeat hears "not registered" and it re-registers
                # and resends its whole index.
                # The agent retries with a capped backoff while the controller is away: allow for a slow start.
                wait_until(held, timeout=90, what="agent re-registered with its index")
                status, body = post(http_port, "/query_worker_info", {"instance_id": "phoenix"})
                assert status == 200 and body["worker_infos"][0]["state"] == "up"
                status, body = post(http_port, "/compress", {"instance_id": "phoenix", "method": method_under_test(),
                                                             "location": LOCATION, "tokens": tokens})
                assert status == 200 and body["num_tokens"] == 40
                assert watch_status(http_port, body["event_id"]) == "COMPLETED"
                assert client.location_stats().num_encoded == 3
                status, body = post(http_port, "/health", {"instance_id": "phoenix"})
                assert body["healthy"] is True
            client.close()
        finally:
            agent.stop()
