"""The gateway's routes come from the proto descriptors, and every one is reachable over HTTP."""
from __future__ import annotations

import pytest
from google.api import annotations_pb2

from kvmesh.api.controller.v1 import controller_pb2
from kvmesh.controller.rpc_table import SERVICE, http_route

from .harness import ControllerThread


def annotated_rpcs() -> dict[str, tuple[str, str]]:
    """RPC name -> (verb, path) read straight from the descriptor's google.api.http options."""
    out = {}
    for m in controller_pb2.DESCRIPTOR.services_by_name["Controller"].methods:
        opts = m.GetOptions()
        if opts.HasExtension(annotations_pb2.http):
            rule = opts.Extensions[annotations_pb2.http]
            verb = rule.WhichOneof("pattern")
            out[m.name] = (verb.upper(), getattr(rule, verb))
    return out


def test_route_table_is_the_descriptors_http_options(controller: ControllerThread) -> None:
    expected = annotated_rpcs()
    assert expected, "the Controller service declares HTTP routes"
    assert "Compress" in expected and expected["Compress"] == ("POST", "/compress")
    routes = {name: (verb, path) for verb, path, name in controller.server.gateway.routes}
    assert routes == expected
    # Agent-facing RPCs carry no route and so are not on the gateway.
    assert "RegisterWorker" not in routes and "Heartbeat" not in routes


def test_path_templates_match_one_segment() -> None:
    route = http_route(SERVICE.methods_by_name["GetEvent"])
    assert route is not None
    assert route.match("/events/Compress123") == {"event_id": "Compress123"}
    assert route.match("/events/a/b") is None
    assert route.match("/events/") is None


@pytest.mark.parametrize("name", sorted(annotated_rpcs()))
def test_every_route_is_reachable(controller: ControllerThread, name: str) -> None:
    verb, template = annotated_rpcs()[name]
    path = template.replace("{event_id}", "Nope0")
    r = controller.http(verb, path, {} if verb == "POST" else None)
    # Reaching the handler means a domain answer: 200, or a 4xx from the RPC itself, never "no route".
    assert r.status in (200, 400, 404), (name, r.status, r.body)
    if r.status != 200:
        assert "no route" not in r.body["error"]["message"], (name, r.body)
        assert r.body["error"]["message"] and r.body["detail"] == r.body["error"]["message"]


def test_unknown_route_is_404_listing_routes(controller: ControllerThread) -> None:
    r = controller.post("/compres", {})
    assert r.status == 404
    assert "/compress" in r.body["error"]["message"]


def test_wrong_method_is_405_with_allow(controller: ControllerThread) -> None:
    r = controller.http("GET", "/compress")
    assert r.status == 405
    assert r.headers["allow"] == "POST"
    r = controller.http("POST", "/events/abc")
    assert r.status == 405
    assert r.headers["allow"] == "GET"
    r = controller.http("DELETE", "/metrics")
    assert r.status == 405
