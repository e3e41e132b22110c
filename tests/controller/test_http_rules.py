"""The gateway refuses, at start, HttpRule features it does not implement, instead of serving them wrong."""
from __future__ import annotations

import pytest
from google.api import annotations_pb2, http_pb2

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.controller.gateway import UnsupportedHttpRule, check_http_rule
from kvmesh.controller.rpc_table import SERVICE

GET_EVENT = pb.GetEventRequest.DESCRIPTOR
COMPRESS = pb.CompressRequest.DESCRIPTOR


def test_every_declared_rule_is_supported() -> None:
    checked = 0
    for method in SERVICE.methods:
        opts = method.GetOptions()
        if opts.HasExtension(annotations_pb2.http):
            check_http_rule(method.full_name, opts.Extensions[annotations_pb2.http], method.input_type)
            checked += 1
    assert checked >= 14


@pytest.mark.parametrize("rule, request_desc, needle", [
    (http_pb2.HttpRule(post="/compress", body="*", response_body="event_id"), COMPRESS, "response_body 'event_id'"),
    (http_pb2.HttpRule(post="/compress", body="*",
                       additional_bindings=[http_pb2.HttpRule(post="/v2/compress", body="*")]),
     COMPRESS, "1 additional_bindings"),
    (http_pb2.HttpRule(post="/compress", body="tokens"), COMPRESS, "body 'tokens'"),
    (http_pb2.HttpRule(get="/events", body="*"), GET_EVENT, "a body on GET"),
    (http_pb2.HttpRule(post="/events/{event_id}:cancel", body="*"), GET_EVENT, "custom verb"),
    (http_pb2.HttpRule(custom=http_pb2.CustomHttpPattern(kind="HEAD", path="/events")), GET_EVENT,
     "pattern 'custom'"),
    (http_pb2.HttpRule(get="/events/{event_id=ev/*}"), GET_EVENT, "path variable {event_id=ev/*}"),
    (http_pb2.HttpRule(get="/events/**"), GET_EVENT, "path segment '**'"),
    (http_pb2.HttpRule(get="/events/{nope}"), GET_EVENT,
     "'nope' is not a field of kvmesh.api.controller.v1.GetEventRequest"),
    (http_pb2.HttpRule(get="events"), GET_EVENT, "does not start with '/'"),
    (http_pb2.HttpRule(get="/events/ev-{event_id}"), GET_EVENT, "path segment 'ev-{}'"),
])
def test_unsupported_features_are_refused(rule: http_pb2.HttpRule, request_desc: object, needle: str) -> None:
    with pytest.raises(UnsupportedHttpRule, match="does not implement") as err:
        check_http_rule("kvmesh.api.controller.v1.Controller.X", rule, request_desc)  # type: ignore[arg-type]
    assert needle in str(err.value) and "Controller.X" in str(err.value)


def test_several_problems_are_named_together() -> None:
    rule = http_pb2.HttpRule(post="/compress", body="tokens", response_body="event_id")
    with pytest.raises(UnsupportedHttpRule) as err:
        check_http_rule("X", rule, COMPRESS)
    assert "response_body" in str(err.value) and "body 'tokens'" in str(err.value)
