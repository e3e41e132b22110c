"""The gRPC face of the controller: a generic handler built from the RPC table, errors mapped once.

Servicers stay thin: each RPC calls its handler; a ``KVMeshError`` becomes its gRPC status with the
message as detail, anything else is logged with its traceback and answered INTERNAL.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from google.protobuf import message

from kvmesh.errors import KVMeshError

from .rpc_table import SERVICE, Rpc

logger = logging.getLogger(__name__)


def _unary(rpc: Rpc) -> Callable[[message.Message, grpc.aio.ServicerContext], object]:
    async def behavior(request: message.Message, context: grpc.aio.ServicerContext) -> message.Message:
        try:
            return await rpc.handler(request)  # type: ignore[misc]
        except KVMeshError as err:
            await context.abort(err.grpc_code, err.message)
        except Exception:
            logger.exception("%s failed", rpc.full_name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{rpc.name} failed inside the controller (a bug)")
        raise AssertionError("unreachable: abort raises")
    return behavior


def _stream(rpc: Rpc) -> Callable[[message.Message, grpc.aio.ServicerContext], AsyncIterator[message.Message]]:
    async def behavior(request: message.Message, context: grpc.aio.ServicerContext) -> AsyncIterator[message.Message]:
        try:
            async for item in rpc.handler(request):  # type: ignore[attr-defined]
                yield item
        except KVMeshError as err:
            await context.abort(err.grpc_code, err.message)
        except Exception:
            logger.exception("%s failed", rpc.full_name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{rpc.name} failed inside the controller (a bug)")
    return behavior


def generic_handler(rpcs: Sequence[Rpc]) -> grpc.GenericRpcHandler:
    """The Controller service for ``server.add_generic_rpc_handlers``."""
    handlers = {}
    for rpc in rpcs:
        make = grpc.unary_stream_rpc_method_handler if rpc.server_streaming else grpc.unary_unary_rpc_method_handler
        wrap = _stream if rpc.server_streaming else _unary
        handlers[rpc.name] = make(wrap(rpc), request_deserializer=rpc.request_cls.FromString,
                                  response_serializer=rpc.response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
