"""The HTTP/JSON gateway: a Starlette app whose routes are the ``google.api.http`` options.

Nothing here is specific to one RPC. A request's JSON body (``body: "*"``), path variables and, for
bodiless routes, query parameters are merged into the request message with ``ParseDict`` (unknown
fields and wrong types are 400s); the response is printed with ``MessageToDict`` keeping the proto
field names (the seed's JSON names). Server-streaming RPCs answer newline-delimited JSON.

Bodies are read within bounds (``http_body``); big ones are decoded and converted in a worker thread,
with the token limit checked before the protobuf conversion, so that no request stalls the loop
that also serves the agents' heartbeats.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, json_format, message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kvmesh.core.auth import bearer_ok
from kvmesh.errors import InvalidArgument, KVMeshError, ResourceExhausted, TooBusy

from .http_body import BodyBudget, BodyTimeout, Reservation, declared_length, parse_json_object, read_body
from .metrics import CONTENT_TYPE_LATEST, ControllerMetrics
from .openapi import openapi_document
from .rpc_table import SERVICE, Rpc

logger = logging.getLogger(__name__)

_DYNAMIC_VALUE_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"})
# Doubles that are whole numbers up to this print as JSON integers (exact in a double).
_MAX_EXACT = 1 << 53
JSON = "application/json"
NDJSON = "application/x-ndjson"
# Unread body bytes drained after an early error answer (beyond: the connection is closed).
_DRAIN_BYTES = 16 * 1024 * 1024
# Routes open without the token: liveness only.
OPEN_PATHS = frozenset({"/healthz"})


def _integral(value: object) -> object:
    """Whole-number floats inside a Struct/ListValue/Value as ints (``12.0`` -> ``12``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


_INT64_TYPES = frozenset({descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
                          descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
                          descriptor.FieldDescriptor.TYPE_SFIXED64})


def _fix_numbers(desc: descriptor.Descriptor, obj: dict[str, object]) -> None:
    """Walk ``obj`` (MessageToDict of a ``desc`` message): 64-bit integers as JSON numbers, and whole
    numbers in dynamic values as integers.

    ``google.protobuf.Value`` holds every number as a double, which json_format prints as ``12.0``;
    LMCache's clients expect ``12`` in ``layout_info``.
    """
    for field in desc.fields:
        if field.name not in obj:
            continue
        if field.type in _INT64_TYPES:
            # proto3's JSON mapping writes 64-bit integers as strings; people and LMCache's clients read
            # byte counts as numbers (exact in JSON up to 2**53 for JavaScript readers, always in Python).
            value = obj[field.name]
            obj[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)  # type: ignore[arg-type]
            continue
        if field.message_type is None:
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


def error_body(status: int, message: str, grpc_code: str = "") -> bytes:
    """kvmesh's JSON error: ``{"error": {"code", "status", "message"}, "detail"}``.

    ``detail`` repeats the message in the shape LMCache's (FastAPI) clients read.
    """
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "ERROR"
    err = {"code": status, "status": grpc_code or phrase.upper().replace(" ", "_"), "message": message}
    return json.dumps({"error": err, "detail": message}).encode()


def json_error(status: int, message: str, grpc_code: str = "", headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, grpc_code), status_code=status, media_type=JSON, headers=headers)


def error_response(err: KVMeshError) -> Response:
    """A domain error as its HTTP answer; TooBusy carries ``Retry-After`` (whole seconds, at least 1)."""
    headers = None
    if isinstance(err, TooBusy):
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
    return json_error(err.http_status, err.message, err.grpc_code.name, headers)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


class UnsupportedHttpRule(ValueError):
    """A ``google.api.http`` option uses a feature the gateway does not implement."""


_SIMPLE_VARIABLE = re.compile(r"\{[a-zA-Z_][a-zA-Z0-9_]*\}")


def check_http_rule(name: str, rule: http_pb2.HttpRule, request: descriptor.Descriptor) -> None:
    """Refuse, at start, the HttpRule features this gateway would otherwise serve wrongly.

    Implemented: one verb (get/put/post/delete/patch) with a literal path whose variables are whole
    segments naming top-level fields of the request (``/events/{event_id}``), and a body of ``"*"``
    (the whole message) or none (then query parameters fill the fields). Not implemented:
    ``response_body``, ``additional_bindings``, a body naming one field, custom verbs and patterns,
    ``{x=pattern}`` / ``*`` / ``**`` segments and nested-field variables.
    """
    verb = rule.WhichOneof("pattern")
    problems = []
    if verb == "custom" or verb is None:
        problems.append(f"pattern {verb!r} (use get, put, post, delete or patch)")
    template = getattr(rule, verb) if verb and verb != "custom" else ""
    if rule.response_body:
        problems.append(f"response_body {rule.response_body!r} (the whole response message is always returned)")
    if rule.additional_bindings:
        problems.append(f"{len(rule.additional_bindings)} additional_bindings (declare one route per RPC)")
    if rule.body not in ("", "*"):
        problems.append(f"body {rule.body!r} (only \"*\" or no body)")
    if rule.body == "*" and verb in ("get", "delete"):
        problems.append(f"a body on {verb.upper()}")
    if template:
        if not template.startswith("/"):
            problems.append(f"path {template!r} does not start with '/'")
        last = template.rsplit("/", 1)[-1]
        if ":" in _SIMPLE_VARIABLE.sub("", last):
            problems.append(f"custom verb in {template!r}")
        for var in re.findall(r"\{([^}]*)\}", template):
            if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", var):
                problems.append(f"path variable {{{var}}} (only whole-segment {{field}} variables)")
            elif var not in request.fields_by_name:
                problems.append(f"path variable {var!r} is not a field of {request.full_name}")
        for segment in re.sub(r"\{[^}]*\}", "{}", template).split("/")[1:]:
            if segment != "{}" and any(c in segment for c in "{}*"):
                problems.append(f"path segment {segment!r} (only literals and whole-segment {{field}} variables)")
    if problems:
        raise UnsupportedHttpRule(f"{name}: the google.api.http option uses what the gateway does not implement: "
                                  + "; ".join(problems))


@dataclass(frozen=True)
class GatewayLimits:
    """Bounds of the gateway's requests (the controller's settings fill them)."""

    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    # All request bodies held at once, over all connections.
    max_total_body_bytes: int = 256 * 1024 * 1024
    max_tokens: int = 1 << 20
    # Bodies up to this are decoded on the loop (microseconds); bigger ones in a worker thread.
    inline_parse_bytes: int = 8 * 1024
    # Seconds a whole request body may take to arrive.
    body_timeout: float = 60.0
    parse_threads: int = 2


class HeaderGuard:
    """ASGI middleware for what h11 lets through: headers over the limit when they arrive in one
    read (431), and a request that carries both ``Content-Length`` and ``Transfer-Encoding`` (400:
    the two framings could be read differently by a proxy in front, the request-smuggling pattern).
    """

    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            names = {k for k, _ in headers}
            if size > self.max_header_bytes:
                response = json_error(431, f"request headers of {size} bytes are over the limit of "
                                           f"{self.max_header_bytes} bytes (--max-header-bytes)",
                                      headers={"Connection": "close"})
            elif b"content-length" in names and b"transfer-encoding" in names:
                response = json_error(400, "a request may carry Content-Length or Transfer-Encoding, not both",
                                      headers={"Connection": "close"})
            else:
                await self.app(scope, receive, send)
                return
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every request but liveness needs ``Authorization: Bearer <token>``.

    Runs before routing and before any body is read, so a caller without the token learns nothing
    (not even the route list) and costs no memory. No token configured: everything passes.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) == 1 and bearer_ok(values[0], self.token):
            await self.app(scope, receive, send)
            return
        why = "missing" if not values else "wrong"
        body = json.loads(error_body(401, f"the Authorization header is {why}: send 'Authorization: Bearer "
                                          "<token>' with the controller's auth token", "UNAUTHENTICATED"))
        body["code"] = "UNAUTHENTICATED"
        response = Response(json.dumps(body).encode(), status_code=401, media_type=JSON,
                            headers={"WWW-Authenticate": 'Bearer realm="kvmesh"'})
        await response(scope, receive, send)


class Gateway:
    """Turns HTTP requests into calls of the RPC table's handlers; ``app`` is the ASGI application."""

    def __init__(self, rpcs: Sequence[Rpc], metrics: ControllerMetrics, limits: GatewayLimits | None = None,
                 *, token: str | None = None) -> None:
        self._routes = [r for r in rpcs if r.route is not None]
        for rpc in self._routes:
            method = SERVICE.methods_by_name[rpc.name]
            check_http_rule(method.full_name, method.GetOptions().Extensions[annotations_pb2.http], method.input_type)
        self._metrics = metrics
        self.limits = limits or GatewayLimits()
        self.budget = BodyBudget(self.limits.max_total_body_bytes)
        self._executor = ThreadPoolExecutor(max_workers=self.limits.parse_threads, thread_name_prefix="gateway-parse")
        self._openapi = _encode(openapi_document(self._routes))
        self.app = Starlette(
            routes=self._starlette_routes(),
            middleware=[Middleware(HeaderGuard, max_header_bytes=self.limits.max_header_bytes),
                        Middleware(BearerAuth, token=token)],
            exception_handlers={HTTPException: self._http_exception, Exception: self._internal_error})
        self.app.router.redirect_slashes = False

    def close(self) -> None:
        """Stop the parse threads (after the server stopped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def routes(self) -> list[tuple[str, str, str]]:
        """(verb, path template, RPC name) of every route."""
        return [(r.route.verb, r.route.template, r.name) for r in self._routes if r.route is not None]

    # -- routing -------------------------------------------------------------------------------

    def _starlette_routes(self) -> list[Route]:
        by_template: dict[str, list[Rpc]] = {}
        for rpc in self._routes:
            assert rpc.route is not None
            by_template.setdefault(rpc.route.template, []).append(rpc)
        routes = [Route(template, _AnyMethod(self._endpoint(rpcs))) for template, rpcs in by_template.items()]
        routes += [Route("/metrics", _AnyMethod(self._metrics_page)), Route("/healthz", _AnyMethod(self._healthz)),
                   Route("/openapi.json", _AnyMethod(self._openapi_page))]
        return routes

    def _endpoint(self, rpcs: list[Rpc]):  # noqa: ANN202 - a Starlette endpoint
        """One endpoint per path template; it picks the RPC by verb (HEAD serves GET)."""
        by_verb = {rpc.route.verb: rpc for rpc in rpcs if rpc.route is not None}

        async def endpoint(request: Request) -> Response:
            verb = "GET" if request.method == "HEAD" and "GET" in by_verb else request.method
            rpc = by_verb.get(verb)
            if rpc is None:
                allowed = ", ".join(sorted(by_verb))
                return json_error(405, f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
                                  headers={"Allow": allowed})
            return await self._call(rpc, request)
        return endpoint

    @staticmethod
    def _only_get(request: Request) -> Response | None:
        if request.method in ("GET", "HEAD"):
            return None
        return json_error(405, f"{request.method} is not allowed on {request.url.path}; use GET",
                          headers={"Allow": "GET"})

    async def _metrics_page(self, request: Request) -> Response:
        return self._only_get(request) or Response(self._metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        """Liveness: the process serves HTTP (open without the token, says nothing else)."""
        return self._only_get(request) or Response(b'{"status":"ok"}', media_type=JSON)

    async def _openapi_page(self, request: Request) -> Response:
        return self._only_get(request) or Response(self._openapi, media_type=JSON)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return json_error(404, f"no route for {request.url.path}; routes: "
                                   + ", ".join(f"{v} {t}" for v, t, _ in self.routes))
        return json_error(exc.status_code, exc.detail, headers=exc.headers)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        logger.error("HTTP handler failed for %s %s", request.method, request.url.path, exc_info=exc)
        return json_error(500, "internal error in the controller (a bug)")

    # -- requests ------------------------------------------------------------------------------

    async def _call(self, rpc: Rpc, request: Request) -> Response:
        reservation = Reservation(self.budget)
        try:
            msg = await self._request_message(rpc, request, reservation)
        except KVMeshError as err:
            self._metrics.requests_total.labels(rpc=rpc.name, code=err.grpc_code.name).inc()
            response = error_response(err)
            if getattr(err, "close_connection", False):
                response.headers["Connection"] = "close"
            return response
        finally:
            reservation.close()
        try:
            if rpc.server_streaming:
                return await self._stream(rpc, msg, head=request.method == "HEAD")
            resp = await rpc.handler(msg)  # type: ignore[misc]
        except KVMeshError as err:
            return error_response(err)
        return Response(await self._to_json(resp), media_type=JSON)  # type: ignore[arg-type]

    async def _to_json(self, msg: message.Message) -> bytes:
        """The response body; a big message is printed in a worker thread, off the loop."""
        if msg.ByteSize() <= self.limits.inline_parse_bytes:
            return _encode(message_to_json(msg))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: _encode(message_to_json(msg)))

    async def _request_message(self, rpc: Rpc, request: Request, reservation: Reservation) -> message.Message:
        """The request message from body, path and query; a KVMeshError (4xx) when malformed."""
        assert rpc.route is not None
        variables = {k: str(v) for k, v in request.path_params.items()}
        if rpc.route.body != "*":
            return _build(rpc, self._query_fields(rpc, request), variables, self.limits.max_tokens)
        body = await self._read(request, reservation)
        if len(body) <= self.limits.inline_parse_bytes:
            return _build(rpc, _loads_small(body), variables, self.limits.max_tokens)
        # Big: decode (counting tokens first) and convert in a worker thread, off the loop.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _parse_big, rpc, body, variables, self.limits.max_tokens)

    async def _read(self, request: Request, reservation: Reservation) -> bytes:
        declared = declared_length(request.headers.get("content-length"))
        ctype = request.headers.get("content-type")
        has_body = declared != 0 and (declared is not None or "transfer-encoding" in request.headers)
        try:
            if (ctype is not None or has_body) and not _is_json(ctype):
                raise _UnsupportedMediaType(f"Content-Type {ctype or '(none)'!r} is not accepted; request bodies "
                                            f"must be JSON: send 'Content-Type: {JSON}'")
            return await read_body(request.stream(), declared, self.limits.max_body_bytes, reservation,
                                   self.limits.body_timeout)
        except KVMeshError as err:
            # The rest of the body is still coming. uvicorn reads and drops it after the answer, so that
            # the client can read the answer; past a few MB (or of unknown size, or too slow) the
            # connection is closed instead.
            if has_body and (declared is None or declared > _DRAIN_BYTES or isinstance(err, BodyTimeout)):
                err.close_connection = True  # type: ignore[attr-defined]
            raise

    @staticmethod
    def _query_fields(rpc: Rpc, request: Request) -> dict[str, object]:
        desc = rpc.request_cls.DESCRIPTOR
        fields: dict[str, object] = {}
        for name in request.query_params:
            values = request.query_params.getlist(name)
            field = desc.fields_by_name.get(name)
            if field is None:
                valid = ", ".join(f.name for f in desc.fields) or "none"
                raise InvalidArgument(f"unknown query parameter {name!r}; valid: {valid}")
            fields[name] = values if field.is_repeated else values[-1]
        return fields

    async def _stream(self, rpc: Rpc, msg: message.Message, *, head: bool) -> Response:
        items: AsyncIterator[message.Message] = rpc.handler(msg)  # type: ignore[assignment]
        # The first item is awaited before answering, so that a bad request still gets its 4xx.
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = None
        if head:
            await items.aclose()  # type: ignore[attr-defined]
            return Response(media_type=NDJSON)

        async def lines() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield _encode(message_to_json(first)) + b"\n"
                    async for item in items:
                        yield _encode(message_to_json(item)) + b"\n"
            except KVMeshError as err:
                # Headers are gone: the error ends the stream as its last line.
                yield error_body(err.http_status, err.message) + b"\n"
            finally:
                await items.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(lines(), media_type=NDJSON)


class _AnyMethod:
    """An endpoint that receives every method (a plain function would get GET/HEAD only), so that a
    wrong verb gets the gateway's 405 naming the allowed ones."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive))
        await response(scope, receive, send)


class _UnsupportedMediaType(KVMeshError):
    grpc_code = InvalidArgument.grpc_code
    http_status = 415


def _loads_small(body: bytes) -> dict[str, object]:
    """A small body as a JSON object (``{}`` when empty)."""
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"malformed JSON body: {err}") from None
    except RecursionError:
        raise InvalidArgument("the JSON body nests too deep") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"the JSON body must be an object, got {type(parsed).__name__}")
    return parsed


def _parse_big(rpc: Rpc, body: bytes, variables: dict[str, str], max_tokens: int) -> message.Message:
    """In a worker thread: decode (refusing too many tokens early), then convert."""
    fields = parse_json_object(body, max_tokens if "tokens" in rpc.request_cls.DESCRIPTOR.fields_by_name else None)
    return _build(rpc, fields, variables, max_tokens)


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _plain_tokens(desc: descriptor.Descriptor, tokens: object) -> list[int] | None:
    """``tokens`` when it can go into the message's repeated int64 field as it is: a list of JSON
    integers within int64. ParseDict converts such a list item by item in Python (~1.5 ms per 1,000
    tokens, most of an HTTP compress); ``extend`` does it in C. Anything else (strings of digits, which
    proto3 JSON allows, floats, bools, out of range) is left to ParseDict and its error messages."""
    field = desc.fields_by_name.get("tokens")
    if (field is None or field.type != field.TYPE_INT64 or not isinstance(tokens, list) or not tokens
            or not all(type(t) is int for t in tokens)):
        return None
    if min(tokens) < _INT64[0] or max(tokens) > _INT64[1]:  # type: ignore[type-var]
        return None
    return tokens  # type: ignore[return-value]


def _build(rpc: Rpc, fields: dict[str, object], variables: dict[str, str], max_tokens: int) -> message.Message:
    """Merge path variables into ``fields`` and convert them to the RPC's request message (the token
    count is checked first: converting a list costs far more than counting it)."""
    for name, value in variables.items():
        if name in fields and fields[name] != value:
            raise InvalidArgument(f"{name} is {value!r} in the path but {fields[name]!r} in the body")
        fields[name] = value
    desc = rpc.request_cls.DESCRIPTOR
    known = {f.name for f in desc.fields} | {f.json_name for f in desc.fields}
    unknown = sorted(k for k in fields if k not in known)
    if unknown:
        valid = ", ".join(f.name for f in desc.fields) or "none"
        raise InvalidArgument(f"unknown field(s) {', '.join(map(repr, unknown))} for {rpc.name}; valid fields: {valid}")
    tokens = fields.get("tokens")
    if "tokens" in desc.fields_by_name and isinstance(tokens, list) and len(tokens) > max_tokens:
        raise ResourceExhausted(f"{len(tokens)} tokens is over the limit of {max_tokens} (--max-tokens)")
    msg = rpc.request_cls()
    direct = _plain_tokens(desc, tokens)
    if direct is not None:
        fields = {k: v for k, v in fields.items() if k != "tokens"}
    try:
        json_format.ParseDict(fields, msg, ignore_unknown_fields=False)
        if direct is not None:
            msg.tokens.extend(direct)  # type: ignore[attr-defined]
    except json_format.ParseError as err:
        raise InvalidArgument(str(err).replace("\n", " ")) from None
    except RecursionError:
        raise InvalidArgument("the JSON body nests too deep") from None
    return msg
