"""Helpers the test folders share: free ports, readiness waits, real processes."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def tool_path(name: str) -> str | None:
    """A command-line tool: the repository's ``.tools/bin`` (scripts/setup.sh puts Debian's redis-server,
    prometheus and promtool there), beside the running Python, or on PATH; None when absent."""
    import shutil

    return (shutil.which(name, path=str(REPO / ".tools" / "bin"))
            or shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name))


def free_port() -> int:
    """A TCP port free on loopback right now (for processes that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_grpc_healthy(target: str, timeout: float = 60.0, service: str = "") -> None:
    """Block until the standard gRPC health service at ``target`` answers SERVING."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:  # not up yet
                last = err
            time.sleep(0.05)
    raise TimeoutError(f"gRPC health at {target} not SERVING after {timeout}s: {last}")


def wait_http_ok(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Block until GET ``url`` answers 2xx (fails early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if 200 <= resp.status < 300:
                    return
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@contextlib.contextmanager
def running(args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run a real process for the duration of a ``with`` block; SIGTERM (then SIGKILL) after."""
    full_env = {**os.environ, **(env or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(list(args), env=full_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if log:
            out.close()


def console_script(name: str) -> str:
    """Path of one of kvmesh's console scripts in the running interpreter's environment."""
    path = VENV_BIN / name
    return str(path) if path.exists() else name
