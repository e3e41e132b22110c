"""The Controller service's RPCs, read from its proto descriptor: one table for gRPC and HTTP.

Each row names the RPC, its request/response classes, whether it streams, its HTTP route (from the
``google.api.http`` option, when it has one) and the handler that serves it, wrapped so that every
call, whichever transport it came by, is counted in ``kvmesh_requests_total`` and timed.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message, message_factory

from kvmesh.api.controller.v1 import controller_pb2
from kvmesh.errors import KVMeshError

from .metrics import ControllerMetrics

logger = logging.getLogger(__name__)

SERVICE: descriptor.ServiceDescriptor = controller_pb2.DESCRIPTOR.services_by_name["Controller"]
_VERBS = ("get", "put", "post", "delete", "patch")
_TEMPLATE_VAR = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_.]*)\}")


@dataclass(frozen=True)
class HttpRoute:
    verb: str
    template: str
    body: str
    pattern: re.Pattern[str]
    variables: tuple[str, ...]

    def match(self, path: str) -> dict[str, str] | None:
        m = self.pattern.fullmatch(path)
        return m.groupdict() if m else None


@dataclass(frozen=True)
class Rpc:
    name: str
    full_name: str
    request_cls: type[message.Message]
    response_cls: type[message.Message]
    server_streaming: bool
    route: HttpRoute | None
    # (request) -> response, or (request) -> async iterator of responses when server_streaming.
    handler: Callable[[message.Message], object]


def http_route(method: descriptor.MethodDescriptor) -> HttpRoute | None:
    """The method's ``google.api.http`` route, if it declares one."""
    opts = method.GetOptions()
    if not opts.HasExtension(annotations_pb2.http):
        return None
    rule: http_pb2.HttpRule = opts.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    if verb not in _VERBS:
        raise ValueError(f"{method.full_name}: unsupported http pattern {verb!r}")
    template = getattr(rule, verb)
    variables = tuple(_TEMPLATE_VAR.findall(template))
    # A template variable matches one path segment.
    regex = "".join(
        f"(?P<{part[1:-1]}>[^/]+)" if _TEMPLATE_VAR.fullmatch(part) else re.escape(part)
        for part in re.split(r"(\{[^}]*\})", template) if part)
    return HttpRoute(verb=verb.upper(), template=template, body=rule.body, pattern=re.compile(regex),
                     variables=variables)


def _instrumented(name: str, handler: Callable[[message.Message], object], streaming: bool,
                  metrics: ControllerMetrics) -> Callable[[message.Message], object]:
    # The children of each code, looked up once (labels() costs ~10 µs a call) and on first use, so that
    # an RPC never called has no series.
    children: dict[grpc.StatusCode, tuple[object, object]] = {}

    def record(code: grpc.StatusCode, start: float) -> None:
        found = children.get(code)
        if found is None:
            found = children[code] = (metrics.requests_total.labels(rpc=name, code=code.name),
                                      metrics.request_duration_seconds.labels(rpc=name))
        count, duration = found
        count.inc()  # type: ignore[attr-defined]
        duration.observe(time.perf_counter() - start)  # type: ignore[attr-defined]

    def code_of(err: BaseException) -> grpc.StatusCode:
        if isinstance(err, KVMeshError):
            return err.grpc_code
        if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.INTERNAL

    if streaming:
        async def stream(request: message.Message) -> AsyncIterator[message.Message]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                async for item in handler(request):  # type: ignore[attr-defined]
                    yield item
            except BaseException as err:
                code = code_of(err)
                raise
            finally:
                record(code, start)
        return stream

    async def unary(request: message.Message) -> message.Message:
        start = time.perf_counter()
        try:
            resp = await handler(request)  # type: ignore[misc]
        except BaseException as err:
            record(code_of(err), start)
            raise
        record(grpc.StatusCode.OK, start)
        return resp
    return unary


def build(handlers: dict[str, Callable[..., object]], metrics: ControllerMetrics) -> list[Rpc]:
    """Every RPC of the Controller service with its handler; ValueError if one has none."""
    missing = [m.name for m in SERVICE.methods if m.name not in handlers]
    if missing:
        raise ValueError(f"no handler for Controller RPCs: {', '.join(missing)}")
    rows = []
    for m in SERVICE.methods:
        if m.client_streaming:
            raise ValueError(f"{m.full_name}: client streaming is not supported")
        rows.append(Rpc(
            name=m.name, full_name=m.full_name,
            request_cls=message_factory.GetMessageClass(m.input_type),
            response_cls=message_factory.GetMessageClass(m.output_type),
            server_streaming=m.server_streaming, route=http_route(m),
            handler=_instrumented(m.name, handlers[m.name], m.server_streaming, metrics)))
    return rows
