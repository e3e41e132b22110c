"""The HTTP/JSON gateway: routes read from the ``google.api.http`` options, JSON via ``json_format``.

Nothing here is specific to one RPC. A request's JSON body (``body: "*"``), path variables and, for
bodiless routes, query parameters are merged into the request message with ``ParseDict`` (unknown
fields and wrong types are 400s); the response is printed with ``MessageToDict`` keeping the proto
field names (the seed's JSON names). Server-streaming RPCs answer newline-delimited JSON.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence

from google.protobuf import descriptor, json_format, message

from kvmesh.errors import KVMeshError

from .httpd import Request, Response, json_error
from .metrics import CONTENT_TYPE_LATEST, ControllerMetrics
from .rpc_table import Rpc

logger = logging.getLogger(__name__)

_DYNAMIC_VALUE_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"})
# Doubles that are whole numbers up to this print as JSON integers (exact in a double).
_MAX_EXACT = 1 << 53


def _integral(value: object) -> object:
    """Whole-number floats inside a Struct/ListValue/Value as ints (``12.0`` -> ``12``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def _fix_numbers(desc: descriptor.Descriptor, obj: dict[str, object]) -> None:
    """Walk ``obj`` (MessageToDict of a ``desc`` message) and fix numbers in dynamic values.

    ``google.protobuf.Value`` holds every number as a double, which json_format prints as ``12.0``;
    LMCache's clients expect ``12`` in ``layout_info``.
    """
    for field in desc.fields:
        if field.message_type is None or field.name not in obj:
            continue
        value = obj[field.name]
        mt = field.message_type
        if mt.GetOptions().map_entry:
            vt = mt.fields_by_name["value"].message_type
            if vt is None or not isinstance(value, dict):
                continue
            for k, v in value.items():
                if vt.full_name in _DYNAMIC_VALUE_TYPES:
                    value[k] = _integral(v)
                elif isinstance(v, dict):
                    _fix_numbers(vt, v)
        elif mt.full_name in _DYNAMIC_VALUE_TYPES:
            obj[field.name] = _integral(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _fix_numbers(mt, item)
        elif isinstance(value, dict):
            _fix_numbers(mt, value)


def message_to_json(msg: message.Message) -> dict[str, object]:
    """A response message as the gateway prints it."""
    out = json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _fix_numbers(msg.DESCRIPTOR, out)
    return out


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Gateway:
    """Turns HTTP requests into calls of the RPC table's handlers."""

    def __init__(self, rpcs: Sequence[Rpc], metrics: ControllerMetrics) -> None:
        self._routes = [r for r in rpcs if r.route is not None]
        self._metrics = metrics

    @property
    def routes(self) -> list[tuple[str, str, str]]:
        """(verb, path template, RPC name) of every route."""
        return [(r.route.verb, r.route.template, r.name) for r in self._routes if r.route is not None]

    async def handle(self, request: Request) -> Response:
        if request.path == "/metrics":
            if request.method not in ("GET", "HEAD"):
                return json_error(405, f"{request.method} is not allowed on /metrics; use GET", headers={"Allow": "GET"})
            return Response(200, self._metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
        verbs: list[str] = []
        for rpc in self._routes:
            route = rpc.route
            if route is None:
                continue
            variables = route.match(request.path)
            if variables is None:
                continue
            if request.method == route.verb or (request.method == "HEAD" and route.verb == "GET"):
                return await self._call(rpc, request, variables)
            verbs.append(route.verb)
        if verbs:
            allowed = ", ".join(sorted(set(verbs)))
            return json_error(405, f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
                              headers={"Allow": allowed})
        return json_error(404, f"no route for {request.path}; routes: "
                               + ", ".join(f"{v} {t}" for v, t, _ in self.routes))

    def _parse(self, rpc: Rpc, request: Request, variables: dict[str, str]) -> message.Message:
        """The request message from body, path and query; KVMeshError-free ValueError when malformed."""
        route = rpc.route
        fields: dict[str, object] = {}
        if route is not None and route.body == "*":
            if request.body.strip():
                try:
                    parsed = json.loads(request.body)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise ValueError(f"malformed JSON body: {err}") from None
                if not isinstance(parsed, dict):
                    raise ValueError(f"the JSON body must be an object, got {type(parsed).__name__}")
                fields.update(parsed)
        else:
            desc = rpc.request_cls.DESCRIPTOR
            for name, values in request.query.items():
                field = desc.fields_by_name.get(name)
                if field is None:
                    valid = ", ".join(f.name for f in desc.fields) or "none"
                    raise ValueError(f"unknown query parameter {name!r}; valid: {valid}")
                fields[name] = values if field.is_repeated else values[-1]
        for name, value in variables.items():
            if name in fields and fields[name] != value:
                raise ValueError(f"{name} is {value!r} in the path but {fields[name]!r} in the body")
            fields[name] = value
        desc = rpc.request_cls.DESCRIPTOR
        known = {f.name for f in desc.fields} | {f.json_name for f in desc.fields}
        unknown = sorted(k for k in fields if k not in known)
        if unknown:
            valid = ", ".join(f.name for f in desc.fields) or "none"
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))} for {rpc.name}; valid fields: {valid}")
        msg = rpc.request_cls()
        try:
            json_format.ParseDict(fields, msg, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            raise ValueError(str(err).replace("\n", " ")) from None
        return msg

    async def _call(self, rpc: Rpc, request: Request, variables: dict[str, str]) -> Response:
        try:
            msg = self._parse(rpc, request, variables)
        except ValueError as err:
            self._metrics.requests_total.labels(rpc=rpc.name, code="INVALID_ARGUMENT").inc()
            return json_error(400, str(err), "INVALID_ARGUMENT")
        try:
            if rpc.server_streaming:
                return await self._stream(rpc, msg)
            resp = await rpc.handler(msg)  # type: ignore[misc]
        except KVMeshError as err:
            return json_error(err.http_status, err.message, err.grpc_code.name)
        return Response(200, _encode(message_to_json(resp)))  # type: ignore[arg-type]

    async def _stream(self, rpc: Rpc, msg: message.Message) -> Response:
        items: AsyncIterator[message.Message] = rpc.handler(msg)  # type: ignore[assignment]
        # The first item is awaited before answering, so that a bad request still gets its 4xx.
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = None

        async def lines() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield _encode(message_to_json(first)) + b"\n"
                    async for item in items:
                        yield _encode(message_to_json(item)) + b"\n"
            except KVMeshError as err:
                # Headers are gone: the error ends the stream as its last line.
                yield _encode(json.loads(json_error(err.http_status, err.message).body)) + b"\n"
            finally:
                await items.aclose()  # type: ignore[attr-defined]

        return Response(200, content_type="application/x-ndjson", stream=lines())
