"""The ``kvmesh-controller`` process: starts, serves both ports, loads no torch, stops on SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from tests.support import REPO, console_script, free_port, running, wait_grpc_healthy, wait_http_ok

NO_TORCH = """
import asyncio, sys
from kvmesh.controller.server import ControllerServer
from kvmesh.controller.settings import ControllerSettings
import kvmesh.controller.cli

async def main():
    s = ControllerServer(ControllerSettings(port=0, monitor_port=0))
    await s.start()
    await s.stop()
asyncio.run(main())
heavy = sorted(m for m in ("torch", "numpy", "triton", "kvmesh.codecs") if m in sys.modules)
print(heavy)
"""


def test_controller_loads_no_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_process_serves_and_stops_on_sigterm(tmp_path) -> None:  # noqa: ANN001
    http_port, grpc_port = free_port(), free_port()
    args = [console_script("kvmesh-controller"), "--host", "127.0.0.1", "--port", str(http_port),
            "--monitor-port", str(grpc_port), "--max-tokens", "10"]
    log = tmp_path / "controller.log"
    with running(args, log=log) as proc:
        wait_grpc_healthy(f"127.0.0.1:{grpc_port}", timeout=60)
        wait_http_ok(f"http://127.0.0.1:{http_port}/metrics", timeout=60, proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                controller_pb2_grpc.ControllerStub(ch).Lookup(pb.LookupRequest(tokens=list(range(11))), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/lookup", data=json.dumps({"tokens": [1]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["layout_info"] == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "controller stopped" in log.read_text()


def test_bad_flags_are_a_clear_error() -> None:
    proc = subprocess.run([console_script("kvmesh-controller"), "--max-tokens", "0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "max_tokens must be at least 1" in proc.stderr
