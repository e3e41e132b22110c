"""The gRPC face of the controller: a generic handler built from the RPC table.

Servicers stay thin: each RPC calls its handler. Errors are mapped once, by the mesh server's one
interceptor (``kvmesh.core.grpc_server``), which wraps every handler served here: a ``KVMeshError``
becomes its gRPC status with the message as detail, anything else is logged with its traceback and
answered INTERNAL. No second layer here: each one cost a coroutine and a ``try`` on every call.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from google.protobuf import message

from .rpc_table import SERVICE, Rpc


def _unary(rpc: Rpc) -> Callable[[message.Message, grpc.aio.ServicerContext], Awaitable[message.Message]]:
    handler = rpc.handler

    def behavior(request: message.Message, _context: grpc.aio.ServicerContext) -> Awaitable[message.Message]:
        return handler(request)  # type: ignore[return-value]  # a coroutine, awaited by the interceptor's wrapper
    return behavior


def _stream(rpc: Rpc) -> Callable[[message.Message, grpc.aio.ServicerContext], AsyncIterator[message.Message]]:
    handler = rpc.handler

    async def behavior(request: message.Message, _context: grpc.aio.ServicerContext) -> AsyncIterator[message.Message]:
        async for item in handler(request):  # type: ignore[attr-defined]
            yield item
    return behavior


def generic_handler(rpcs: Sequence[Rpc]) -> grpc.GenericRpcHandler:
    """The Controller service for ``MeshServer.add_generic_handler`` (whose interceptor maps errors)."""
    handlers = {}
    for rpc in rpcs:
        make = grpc.unary_stream_rpc_method_handler if rpc.server_streaming else grpc.unary_unary_rpc_method_handler
        wrap = _stream if rpc.server_streaming else _unary
        handlers[rpc.name] = make(wrap(rpc), request_deserializer=rpc.request_cls.FromString,
                                  response_serializer=rpc.response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
