"""A real ``kvmesh-controller`` killed with SIGKILL and started again on the same event database:
an operator's event ids still answer; the event that was running ends FAILED, saying why."""
from __future__ import annotations

import http.client
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.controller.events import RESTARTED
from tests.controller.scripted_agent import ScriptedAgent
from tests.support import console_script, free_port, running, wait_grpc_healthy, wait_http_ok

from .conftest import LOCATION, wait_until


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def stored(db: Path) -> dict[str, float]:
    """event id -> finished_time of every row the controller committed (read as any SQLite reader would)."""
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return dict(conn.execute("SELECT event_id, finished_time FROM events"))
        except sqlite3.OperationalError:  # the table is not created yet
            return {}


def test_events_answer_after_kill_and_restart(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    db = tmp_path / "events.sqlite3"
    args = [console_script("kvmesh-controller"), "--host", "127.0.0.1", "--port", str(http_port),
            "--monitor-port", str(grpc_port), "--event-db", str(db), "--min-chunk-size", "16"]
    with ScriptedAgent(16) as agent:
        with running(args, log=tmp_path / "controller-1.log") as first:
            wait_grpc_healthy(f"127.0.0.1:{grpc_port}", timeout=60)
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                controller_pb2_grpc.ControllerStub(channel).RegisterWorker(pb.RegisterWorkerRequest(
                    instance_id="inst", worker_id=0, ip="127.0.0.1", port=agent.port, methods=["lossless"],
                    locations=[LOCATION], chunk_size=16, heartbeat_interval_seconds=0), timeout=10)
            body = {"instance_id": "inst", "method": "lossless", "location": LOCATION}
            status, done = call(http_port, "POST", "/compress", body)  # no tokens: COMPLETED at once
            assert status == 200
            status, held = call(http_port, "POST", "/compress", {**body, "tokens": list(range(64))})
            assert status == 200 and held["num_tokens"] == 64
            # The scripted agent keeps this one RUNNING; wait until both are committed to the file.
            wait_until(lambda: stored(db).get(done["event_id"], 0) > 0 and held["event_id"] in stored(db),
                       timeout=30, what="both events written to the event database")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)

        with running(args, log=tmp_path / "controller-2.log") as second:
            wait_http_ok(f"http://127.0.0.1:{http_port}/metrics", timeout=60, proc=second)
            status, got = call(http_port, "GET", f"/events/{done['event_id']}")
            assert status == 200 and got["event"]["status"] == "COMPLETED"
            status, got = call(http_port, "GET", f"/events/{held['event_id']}")
            assert status == 200 and got["event"]["status"] == "FAILED"
            assert got["event"]["error"] == RESTARTED
            status, got = call(http_port, "POST", "/check_finish", {"event_id": held["event_id"]})
            assert status == 200 and got["status"] == "FAILED" and got["error"] == RESTARTED
            status, listed = call(http_port, "GET", "/events")
            assert {e["event_id"] for e in listed["events"]} >= {done["event_id"], held["event_id"]}
