"""The gateway's OpenAPI 3.0 document, generated from the same ``google.api.http`` options and
message descriptors that build its routes (nothing is written twice).

JSON follows the gateway's mapping (proto3 JSON with the proto field names): 64-bit integers are
strings in answers and a number or a decimal string in requests, enums are their names, maps are
objects keyed by strings, ``Struct``/``Value``/``ListValue`` are free JSON. Request bodies admit only
the message's fields (unknown ones are a 400).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor

from .rpc_table import Rpc

FD = descriptor.FieldDescriptor
_INT32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
_UINT32 = {FD.TYPE_UINT32, FD.TYPE_FIXED32}
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64}
_UINT64 = {FD.TYPE_UINT64, FD.TYPE_FIXED64}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {"type": "object", "additionalProperties": {}},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "object", "required": ["code", "status", "message"],
                  "properties": {"code": {"type": "integer"}, "status": {"type": "string"},
                                 "message": {"type": "string"}}},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
}


class _Schemas:
    """Component schemas, one per message, in a request (lenient numbers) or response flavour."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def ref(self, desc: descriptor.Descriptor, request: bool) -> dict[str, Any]:
        if desc.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[desc.full_name])
        name = desc.full_name + ("" if not request else ".input")
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages refer to themselves
            self.components[name] = self.message(desc, request)
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, desc: descriptor.Descriptor, request: bool) -> dict[str, Any]:
        props = {f.name: self.field(f, request) for f in desc.fields}
        schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": not request}
        if not request:
            # The gateway prints every field without presence (proto3 scalars, repeated, maps).
            required = [f.name for f in desc.fields
                        if f.containing_oneof is None and f.message_type is None or f.is_repeated]
            if required:  # OpenAPI 3.0 wants at least one name in a "required" list
                schema["required"] = required
        return schema

    def field(self, f: descriptor.FieldDescriptor, request: bool) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.scalar(value, request)}
        item = self.scalar(f, request)
        return {"type": "array", "items": item} if f.is_repeated else item

    def scalar(self, f: descriptor.FieldDescriptor, request: bool) -> dict[str, Any]:
        t = f.type
        if t == FD.TYPE_MESSAGE:
            return self.ref(f.message_type, request)
        if t == FD.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in f.enum_type.values]}
        if t in _INT32:
            return {"type": "integer", "format": "int32", "minimum": -(1 << 31), "maximum": (1 << 31) - 1}
        if t in _UINT32:
            return {"type": "integer", "format": "int32", "minimum": 0, "maximum": (1 << 32) - 1}
        if t in _INT64 or t in _UINT64:
            lo, hi = (0, (1 << 64) - 1) if t in _UINT64 else (-(1 << 63), (1 << 63) - 1)
            pattern = r"^[0-9]+$" if t in _UINT64 else r"^-?[0-9]+$"
            as_number = {"type": "integer", "format": "int64", "minimum": lo, "maximum": hi}
            if not request:
                return as_number  # the gateway prints 64-bit integers as JSON numbers
            return {"oneOf": [as_number, {"type": "string", "format": "int64", "pattern": pattern}]}
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return {"type": "number"}
        if t == FD.TYPE_BOOL:
            return {"type": "boolean"}
        if t == FD.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        return {"type": "string"}


def _parameters(rpc: Rpc, schemas: _Schemas) -> list[dict[str, Any]]:
    assert rpc.route is not None
    desc = rpc.request_cls.DESCRIPTOR
    params = [{"name": v, "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[^/]+$", "minLength": 1}} for v in rpc.route.variables]
    if rpc.route.body != "*":
        for f in desc.fields:
            if f.name in rpc.route.variables or f.message_type is not None:
                continue
            schema = schemas.field(f, request=True)
            param: dict[str, Any] = {"name": f.name, "in": "query", "required": False, "schema": schema}
            if f.is_repeated:
                param.update(style="form", explode=True)
            params.append(param)
    return params


def _operation(rpc: Rpc, schemas: _Schemas) -> dict[str, Any]:
    assert rpc.route is not None
    media = "application/x-ndjson" if rpc.server_streaming else "application/json"
    doc = (rpc.request_cls.DESCRIPTOR.full_name.rsplit(".", 1)[0]).strip()
    op: dict[str, Any] = {
        "operationId": rpc.name,
        "summary": f"{rpc.full_name} ({'a stream of JSON lines' if rpc.server_streaming else 'unary'})",
        "tags": [doc],
        "parameters": _parameters(rpc, schemas),
        "responses": {
            "200": {"description": "the RPC's answer" + (", one JSON object per line" if rpc.server_streaming else ""),
                    "content": {media: {"schema": schemas.ref(rpc.response_cls.DESCRIPTOR, request=False)}}},
            "default": {"description": "an error: what was wrong and what is valid",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
        "security": [{"bearer": []}],
    }
    if rpc.route.body == "*":
        op["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": schemas.ref(rpc.request_cls.DESCRIPTOR, request=True)}}}
    return op


def _plain_get(op_id: str, summary: str, media: str, schema: dict[str, Any], secured: bool = True) -> dict[str, Any]:
    """A GET operation of the gateway's own (non-RPC) routes."""
    return {"operationId": op_id, "summary": summary, "security": [{"bearer": []}] if secured else [],
            "responses": {"200": {"description": summary, "content": {media: {"schema": schema}}},
                          "default": {"description": "an error", "content": {"application/json": {
                              "schema": {"$ref": "#/components/schemas/Error"}}}}}}


def openapi_document(rpcs: Sequence[Rpc], title: str = "kvmesh controller", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.0 document of the routed RPCs plus /metrics, /healthz and /openapi.json."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for rpc in rpcs:
        if rpc.route is None:
            continue
        paths.setdefault(rpc.route.template, {})[rpc.route.verb.lower()] = _operation(rpc, schemas)
    paths["/metrics"] = {"get": _plain_get("Metrics", "Prometheus exposition", "text/plain", {"type": "string"})}
    paths["/healthz"] = {"get": _plain_get(
        "Healthz", "liveness (no token needed)", "application/json",
        {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}},
        secured=False)}
    paths["/openapi.json"] = {"get": _plain_get("OpenApi", "this document", "application/json", {"type": "object"})}
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version,
                 "description": "Generated from the google.api.http options of kvmesh.api.controller.v1.Controller."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_SCHEMA, **schemas.components},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
