"""The one gRPC server bootstrap of the controller and the agents.

``MeshServer`` is a ``grpc.aio`` server with:
- the standard health service (``Check``, ``Watch`` and ``List``), open to every caller so that
  probes and load balancers need no secret;
- server reflection for every service added, which needs the token like any other service when one
  is set (``grpcurl -H 'authorization: Bearer <token>' ... list``);
- one interceptor (``MeshInterceptor``) that refuses calls without ``authorization: Bearer <token>``
  with UNAUTHENTICATED, runs each call with its request id in a contextvar (answered in the trailing
  metadata), and turns a stray exception into INTERNAL with a generic message (never the exception's
  text, which could hold a secret) after logging it;
- TLS (mutual with a CA) when the settings give certificate files, plaintext otherwise; and no bind
  beyond loopback without a token unless ``insecure`` was chosen.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import requestid
from .auth import METADATA_KEY, bearer_ok
from .errors import KVMeshError
from .security import NO_SECURITY, SecuritySettings

logger = logging.getLogger(__name__)

HEALTH_SERVICE = health.SERVICE_NAME  # grpc.health.v1.Health
REFLECTION_SERVICE = reflection.SERVICE_NAME
# Services any caller may reach without the token.
OPEN_SERVICES = frozenset({HEALTH_SERVICE})
UNAUTHENTICATED_DETAIL = ("missing or wrong bearer token: send the metadata 'authorization: Bearer <token>' "
                          "with the token of the file named by KVMESH_AUTH_TOKEN_FILE / --auth-token-file")
MAX_LISTED_SERVICES = 1000


class HealthService(health.aio.HealthServicer):
    """The standard health servicer with ``List`` too (grpcio's answers UNIMPLEMENTED for it, with an
    ERROR traceback in the log, though reflection advertises it)."""

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
                   ) -> health_pb2.HealthListResponse:
        """Every status set so far ("" is the server as a whole), as the health proto's List asks."""
        statuses = dict(self._server_status)  # grpcio's own table of what set() recorded
        if len(statuses) > MAX_LISTED_SERVICES:  # the proto allows refusing an unbounded answer
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{len(statuses)} services, over the {MAX_LISTED_SERVICES} List answers")
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()})


def _service_of(method: str) -> str:
    """``pkg.Service`` of ``/pkg.Service/Method``."""
    return method.lstrip("/").partition("/")[0]


def _metadata_value(metadata: Sequence[Any] | None, key: str) -> str | bytes | None:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v  # type: ignore[no-any-return]
    return None


def _rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
             ) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped, same streaming kind and (de)serializers."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), des, ser)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), des, ser)


async def _fail(context: grpc.aio.ServicerContext, method: str, rid: str, err: Exception) -> None:
    """Abort with the domain error's status, or INTERNAL for a bug (logged, its text kept out)."""
    if isinstance(err, KVMeshError):
        await context.abort(err.grpc_code, err.message)
    if isinstance(err, NotImplementedError):  # a generated servicer's default method
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    logger.error("%s failed (request %s): %s", method, rid, type(err).__name__, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"{method} failed inside the server (a bug; request id {rid} is in its log)")


def _calls(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """``behavior`` run with the call's request id current (answered in the trailing metadata) and
    stray exceptions mapped to statuses. Built once per method, not per call."""
    passthrough = (grpc.aio.AbortError, asyncio.CancelledError)

    def request_id(context: grpc.aio.ServicerContext) -> str:
        rid = requestid.usable(_metadata_value(context.invocation_metadata(), requestid.METADATA_KEY)) \
            or requestid.new_request_id()
        context.set_trailing_metadata(((requestid.METADATA_KEY, rid),))
        return rid

    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            rid, reset_token = requestid.set_request_id(request_id(context))
            try:
                async for item in behavior(request, context):
                    yield item
            except passthrough:
                raise
            except Exception as err:
                await _fail(context, method, rid, err)
            finally:
                requestid.reset(reset_token)
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid, reset_token = requestid.set_request_id(request_id(context))
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except passthrough:
            raise
        except Exception as err:
            await _fail(context, method, rid, err)
        finally:
            requestid.reset(reset_token)
    return unary


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAIL)


def _ignore(_data: bytes) -> None:
    """The request deserializer of a refused call: its bytes are never parsed."""
    return None


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses the call without parsing its request."""
    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, _ignore, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, _ignore, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, _ignore, ser)
    return grpc.unary_unary_rpc_method_handler(_deny, _ignore, ser)


class MeshInterceptor(grpc.aio.ServerInterceptor):
    """Token check (all but ``OPEN_SERVICES``), request id, stray exceptions -> INTERNAL.

    The handlers of each method (wrapped, and refusing) are built on its first call and reused: the
    per-call work is the token comparison. A refused call's request is never parsed."""

    def __init__(self, token: str | None, open_services: frozenset[str] = OPEN_SERVICES) -> None:
        self._token = token
        self._open = open_services
        # method -> (wrapped handler, refusing handler or None when open). One entry per registered
        # method (unknown methods are not cached), so bounded by the services served.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        found = self._handlers.get(method)
        if found is None:
            handler = await continuation(details)
            if handler is None:
                return None  # UNIMPLEMENTED, as without the interceptor
            guarded = self._token is not None and _service_of(method) not in self._open
            found = (_rebuild(handler, lambda behavior: _calls(method, behavior)),
                     _denied(handler) if guarded else None)
            self._handlers[method] = found
        wrapped, denied = found
        if denied is not None and not bearer_ok(_metadata_value(details.invocation_metadata, METADATA_KEY),
                                                self._token):
            return denied
        return wrapped


class MeshServer:
    """A gRPC server of the mesh: ``add_*`` services, ``bind`` ports, ``await start()``, ``await stop()``."""

    def __init__(self, security: SecuritySettings = NO_SECURITY, *, options: Sequence[tuple[str, Any]] = (),
                 health_servicer: HealthService | None = None) -> None:
        self.security = security
        self.health = health_servicer or HealthService()
        self.server = grpc.aio.server(options=list(options), interceptors=[MeshInterceptor(security.token)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services: list[str] = []
        self.ports: list[int] = []
        self._started = False

    def add_service(self, name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Add service ``name`` with ``register(server)`` (e.g. a generated ``add_XServicer_to_server``)."""
        register(self.server)
        self.services.append(name)

    def add_generic_handler(self, name: str, handler: grpc.GenericRpcHandler) -> None:
        self.add_service(name, lambda server: server.add_generic_rpc_handlers((handler,)))

    def bind(self, host: str, port: int, what: str = "gRPC") -> int:
        """Listen on ``host:port`` (TLS when configured); the bound port. ``BindRefused`` beyond loopback
        with no token (unless insecure), ``OSError`` when the port cannot be bound."""
        self.security.check_bind(host, what)
        address = f"{host}:{port}"
        creds = self.security.server_credentials()
        try:
            bound = self.server.add_secure_port(address, creds) if creds is not None else \
                self.server.add_insecure_port(address)
        except RuntimeError as err:  # recent grpc raises on a failed bind, older ones return 0
            raise OSError(f"cannot bind {what} to {address}: {err}") from err
        if bound == 0:
            raise OSError(f"cannot bind {what} to {address} (in use?)")
        self.ports.append(bound)
        return bound

    async def start(self, *, serving: bool = True) -> None:
        """Enable reflection for every service, start, and (by default) report SERVING."""
        reflection.enable_server_reflection((*self.services, HEALTH_SERVICE, REFLECTION_SERVICE), self.server)
        await self.server.start()
        self._started = True
        if serving:
            await self.set_serving()

    async def set_serving(self) -> None:
        """Report SERVING for the server as a whole ("") and for each service."""
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING to health watchers, then stop with ``grace`` seconds for in-flight calls."""
        if self._started:
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self._started = False

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)
