"""The shared gRPC bootstrap on a small real server: token check, open health (Check and List),
reflection behind the token, request ids through contextvars, stray exceptions -> INTERNAL without
their text, and the channel factory sending the token and the request id."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.core import requestid
from kvmesh.core.auth import BindRefused
from kvmesh.core.channels import aio_channel
from kvmesh.core.errors import NotFound
from kvmesh.core.grpc_server import MeshServer
from kvmesh.core.security import SecuritySettings

TOKEN = "core-test-token-0123456789"
SECRET_IN_ERROR = "password=hunter2-" + TOKEN
SERVICE = "kvmesh.test.Probe"


async def _echo_id(request: bytes, context: Any) -> bytes:
    return (requestid.current() or "").encode()


async def _boom(request: bytes, context: Any) -> bytes:
    raise RuntimeError(SECRET_IN_ERROR)


async def _not_found(request: bytes, context: Any) -> bytes:
    raise NotFound("no such thing: ask for an existing one")


async def _stream_boom(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"one"
    raise ValueError(SECRET_IN_ERROR)


def _probe_handler(relay_security: SecuritySettings, port_box: list[int]) -> grpc.GenericRpcHandler:
    async def relay(request: bytes, context: Any) -> bytes:
        # Calls Echo on the same server through the factory: the request id must travel.
        async with aio_channel(f"127.0.0.1:{port_box[0]}", relay_security) as ch:
            return await ch.unary_unary(f"/{SERVICE}/Echo")(b"")  # type: ignore[no-any-return]

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo_id),
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
        "StreamBoom": grpc.unary_stream_rpc_method_handler(_stream_boom),
        "Relay": grpc.unary_unary_rpc_method_handler(relay),
    })


async def _server(token: str | None) -> tuple[MeshServer, int]:
    security = SecuritySettings(token=token)
    port_box: list[int] = []
    server = MeshServer(security)
    server.add_generic_handler(SERVICE, _probe_handler(security, port_box))
    port_box.append(server.bind("127.0.0.1", 0))
    await server.start()
    return server, port_box[0]


@pytest.fixture
async def secured() -> AsyncIterator[int]:
    server, port = await _server(TOKEN)
    yield port
    await server.stop(0)


@pytest.fixture
async def open_server() -> AsyncIterator[int]:
    server, port = await _server(None)
    yield port
    await server.stop(0)


async def _code(port: int, method: str, metadata: Any = None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            await ch.unary_unary(f"/{SERVICE}/{method}")(b"", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_calls_need_the_token(secured: int) -> None:
    assert await _code(secured, "Echo") == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(secured, "Echo", (("authorization", "Bearer wrong-token-xxxxxxxxxxx"),)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert await _code(secured, "Echo", (("authorization", TOKEN),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(secured, "Echo", (("authorization", f"Bearer {TOKEN}"),)) == grpc.StatusCode.OK


async def test_the_unauthenticated_answer_says_what_to_send(secured: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/StreamBoom")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in (info.value.details() or "")


async def test_no_token_configured_lets_every_call_in(open_server: int) -> None:
    assert await _code(open_server, "Echo") == grpc.StatusCode.OK


async def test_unknown_method_stays_unimplemented(secured: int) -> None:
    assert await _code(secured, "Nope") == grpc.StatusCode.UNIMPLEMENTED


async def test_health_check_and_list_are_open(secured: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        listed = await stub.List(health_pb2.HealthListRequest(), timeout=10)
    statuses = {name: st.status for name, st in listed.statuses.items()}
    assert statuses == {"": health_pb2.HealthCheckResponse.SERVING, SERVICE: health_pb2.HealthCheckResponse.SERVING}


async def _reflected_services(port: int, metadata: Any = None) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                         metadata=metadata, timeout=10)
        async for resp in call:
            return sorted(s.name for s in resp.list_services_response.service)
    return []


async def test_reflection_lists_every_service_with_the_token(secured: int) -> None:
    services = await _reflected_services(secured, (("authorization", f"Bearer {TOKEN}"),))
    assert services == sorted([SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _reflected_services(secured)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_stray_exception_is_internal_without_its_text(secured: int) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-boom-1"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/Boom")(b"", metadata=auth, timeout=10)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert TOKEN not in (info.value.details() or "") and "hunter2" not in (info.value.details() or "")
        assert "req-boom-1" in (info.value.details() or "")
        call = ch.unary_stream(f"/{SERVICE}/StreamBoom")(b"", metadata=auth, timeout=10)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in call:
                got.append(item)
        assert got == [b"one"] and info.value.code() == grpc.StatusCode.INTERNAL
        assert "hunter2" not in (info.value.details() or "")


async def test_a_domain_error_keeps_its_code(secured: int) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/NotFound")(b"", metadata=auth, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing: ask for an existing one"


async def test_request_id_from_the_caller_or_new(secured: int) -> None:
    async with aio_channel(f"127.0.0.1:{secured}", SecuritySettings(token=TOKEN)) as ch:
        echo = ch.unary_unary(f"/{SERVICE}/Echo")
        call = echo(b"", metadata=(("x-request-id", "op-42"),), timeout=10)
        assert await call == b"op-42"
        assert ("x-request-id", "op-42") in tuple(await call.trailing_metadata())
        fresh = (await echo(b"", timeout=10)).decode()
        assert len(fresh) == 32 and int(fresh, 16) >= 0
        # An id that could forge log lines is replaced.
        assert (await echo(b"", metadata=(("x-request-id", "a b;FAKE=1"),), timeout=10)).decode() != "a b;FAKE=1"


async def test_the_factory_sends_the_token_and_the_current_request_id(secured: int) -> None:
    async with aio_channel(f"127.0.0.1:{secured}", SecuritySettings(token=TOKEN)) as ch:
        relayed = await ch.unary_unary(f"/{SERVICE}/Relay")(b"", metadata=(("x-request-id", "chain-7"),),
                                                             timeout=10)
    assert relayed == b"chain-7"


async def test_a_factory_channel_with_a_wrong_token_is_refused(secured: int) -> None:
    async with aio_channel(f"127.0.0.1:{secured}", SecuritySettings(token="not-the-token-0123456")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/Echo")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bind_beyond_loopback_without_token_is_refused_before_listening() -> None:
    server = MeshServer(SecuritySettings())
    with pytest.raises(BindRefused, match="without an auth token"):
        server.bind("0.0.0.0", 0, "the probe")
    assert server.ports == []
    await server.stop(0)


async def test_a_taken_port_is_an_os_error(secured: int) -> None:
    server = MeshServer(SecuritySettings(token=TOKEN), options=[("grpc.so_reuseport", 0)])
    with pytest.raises(OSError, match="cannot bind"):
        server.bind("127.0.0.1", secured)
    await server.stop(0)
