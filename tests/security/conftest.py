"""Fixtures of the security tests: a token file, certificates from scripts/make_certs.sh (two CAs),
real controllers and agents on loopback in their own event-loop threads, and callers that reach
every RPC of a service straight from its descriptor."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.controller.v1 import controller_pb2
from kvmesh.core.security import SecuritySettings
from tests.security.certs import make_certs

TOKEN = "security-suite-token-0123456789abcdef"
WRONG_TOKEN = "security-suite-WRONG-0123456789abcdef"
CONTROLLER_SERVICE: ServiceDescriptor = controller_pb2.DESCRIPTOR.services_by_name["Controller"]
AGENT_SERVICE: ServiceDescriptor = agent_pb2.DESCRIPTOR.services_by_name["InstanceAgent"]


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("ca-right"))


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA and its certificates (what an impostor would hold)."""
    return make_certs(tmp_path_factory.mktemp("ca-wrong"))


def mtls(certs: Path, *, token: str | None = TOKEN, who: str = "server", ca: Path | None = None) -> SecuritySettings:
    return SecuritySettings(token=token, tls_cert=str(certs / f"{who}.crt"), tls_key=str(certs / f"{who}.key"),
                            tls_ca=str((ca or certs) / "ca.crt"))


class AgentThread:
    """A real ``InstanceAgent`` on its own event-loop thread (``with AgentThread(config) as a``)."""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        self.config = config
        self.kwargs = {"metrics_port": -1, **kwargs}
        self.agent: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent-loop", daemon=True)

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> AgentThread:
        from kvmesh.instance_agent.agent import InstanceAgent

        self._thread.start()

        async def make() -> Any:
            agent = InstanceAgent(self.config, **self.kwargs)
            await agent.start()
            return agent

        try:
            self.agent = self.call(make())
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.agent is not None:
            self.call(self.agent.stop(grace=0))
            self.agent = None
        self._close()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def target(self) -> str:
        return f"localhost:{self.agent.grpc_port}"


def agent_config(**overrides: Any) -> Any:
    from kvmesh.instance_agent.config import AgentConfig

    values: dict[str, Any] = dict(chunk_size=4, max_local_cpu_size=8 / 1024, lmcache_worker_ports=[0],
                                  lmcache_instance_id="security_instance", lmcache_worker_heartbeat_time=0.2)
    values.update(overrides)
    return AgentConfig(**values)


def _classes(method: MethodDescriptor) -> tuple[Any, Any]:
    return message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(method.output_type)


def call_code(channel: grpc.Channel, method: MethodDescriptor, metadata: Any = None,
              request: Any = None, timeout: float = 15.0) -> grpc.StatusCode:
    """Call ``method`` (any streaming kind) with ``request`` (default: empty); the status it ended with."""
    req_cls, resp_cls = _classes(method)
    request = request if request is not None else req_cls()
    path = f"/{method.containing_service.full_name}/{method.name}"
    ser, des = req_cls.SerializeToString, resp_cls.FromString
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path, ser, des)(iter([request]), metadata=metadata, timeout=timeout):
                pass
        elif method.client_streaming:
            channel.stream_unary(path, ser, des)(iter([request]), metadata=metadata, timeout=timeout)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, ser, des)(request, metadata=metadata, timeout=timeout):
                pass
        else:
            channel.unary_unary(path, ser, des)(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def poll(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Wait until ``check()`` is truthy (polling a condition, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def agent_thread() -> Iterator[Callable[..., AgentThread]]:
    started: list[AgentThread] = []

    def start(config: Any, **kwargs: Any) -> AgentThread:
        a = AgentThread(config, **kwargs).__enter__()
        started.append(a)
        return a

    yield start
    for a in reversed(started):
        a.__exit__(None, None, None)
