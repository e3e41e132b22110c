"""A real controller for tests: ``ControllerServer`` on its own event-loop thread, ports 0.

Tests talk to it as clients do (HTTP with ``http.client``, gRPC with the generated stubs), so they
stay synchronous and the controller's loop is never blocked by a test.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.controller.server import ControllerServer
from kvmesh.controller.settings import ControllerSettings
from kvmesh.core.channels import channel


@dataclass
class HttpResult:
    status: int
    body: Any
    headers: dict[str, str]


class ControllerThread:
    """Starts a controller (``with ControllerThread(...) as c``) and offers clients for it."""

    def __init__(self, **settings: Any) -> None:
        # Events in memory (tests that want the SQLite store pass event_db); small chunks allowed.
        base = {"host": "127.0.0.1", "port": 0, "monitor_port": 0, "health_check_interval": 0.1,
                "event_db": ":memory:", "min_chunk_size": 4}
        self.settings = ControllerSettings(**{**base, **settings})
        self.server: ControllerServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="controller-loop", daemon=True)
        self._channel: grpc.Channel | None = None
        # (instance, worker) -> the secret its last registration through ``register`` returned.
        self.secrets: dict[tuple[str, int], str] = {}

    def __enter__(self) -> ControllerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self.server = self.call(self._make())
        # The stub carries the controller's token (and TLS) when it has them.
        self._channel = channel(self.grpc_target, self.settings.security)

    async def _make(self) -> ControllerServer:
        server = ControllerServer(self.settings)
        await server.start()
        return server

    def stop(self) -> None:
        """Stop the controller and its loop (again: nothing)."""
        if self._loop.is_closed():
            return
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.server is not None:
            self.call(self.server.stop())
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the controller's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def sync(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the controller's loop (to touch its state safely)."""
        async def run() -> Any:
            return fn(*args)
        return self.call(run())

    @property
    def http_port(self) -> int:
        assert self.server is not None
        return self.server.http_port

    @property
    def grpc_target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def stub(self) -> controller_pb2_grpc.ControllerStub:
        assert self._channel is not None
        return controller_pb2_grpc.ControllerStub(self._channel)

    def http(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 30.0) -> HttpResult:
        """One HTTP request; the body parsed as JSON when it is JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
            ctype = resp.getheader("Content-Type", "")
            parsed: Any = payload
            if "json" in ctype and "ndjson" not in ctype:
                parsed = json.loads(payload)
            elif "ndjson" in ctype:
                parsed = [json.loads(line) for line in payload.splitlines() if line.strip()]
            return HttpResult(resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()

    def post(self, path: str, body: Any = None, **kw: Any) -> HttpResult:
        return self.http("POST", path, body, **kw)

    def register(self, instance_id: str = "inst", worker_id: int = 0, *, port: int = 1, ip: str = "127.0.0.1",
                 methods: tuple[str, ...] = ("lossless", "cachegen"),
                 locations: tuple[str, ...] = ("LocalCPUBackend",), chunk_size: int = 4,
                 heartbeat: float = 0.0, secret: str = "",
                 model_files: tuple[str, ...] = ()) -> pb.RegisterWorkerResponse:
        """Register a worker over gRPC, as an agent does (its secret kept in ``secrets``)."""
        resp = self.stub.RegisterWorker(pb.RegisterWorkerRequest(
            instance_id=instance_id, worker_id=worker_id, ip=ip, port=port, methods=methods,
            locations=locations, chunk_size=chunk_size, heartbeat_interval_seconds=heartbeat, secret=secret,
            model_files=model_files),
            timeout=10)
        self.secrets[(instance_id, worker_id)] = resp.secret
        return resp

    def secret(self, instance_id: str = "inst", worker_id: int = 0) -> str:
        return self.secrets.get((instance_id, worker_id), "")

    def heartbeat(self, instance_id: str = "inst", worker_id: int = 0) -> pb.HeartbeatResponse:
        return self.stub.Heartbeat(pb.HeartbeatRequest(instance_id=instance_id, worker_id=worker_id,
                                                       secret=self.secret(instance_id, worker_id)), timeout=5)

    def wait_event(self, event_id: str, timeout: float = 60.0) -> pb.WatchEventResponse:
        """Watch an event to its end over gRPC; the last update."""
        last = None
        for update in self.stub.WatchEvent(pb.WatchEventRequest(event_id=event_id), timeout=timeout):
            last = update
        assert last is not None
        return last


def iter_ndjson(port: int, path: str, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    """Stream an NDJSON route line by line (http.client decodes the chunked encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200:
            raise AssertionError(f"{path}: HTTP {resp.status}: {resp.read()!r}")
        while True:
            line = resp.readline()
            if not line:
                return
            if line.strip():
                yield json.loads(line)
    finally:
        conn.close()
