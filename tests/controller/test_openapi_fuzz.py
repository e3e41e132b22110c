"""Fuzz every operation of the gateway's own OpenAPI document (schemathesis) against a real controller
(auth on, no agents registered).

The document is the one the controller serves (generated from the google.api.http options), so a new
route is fuzzed without editing this file. Valid and invalid requests alike must get an answer that
is not a 5xx, whose status, content type, headers and body are the documented ones; invalid requests
must be refused with a 4xx (negative cases include a missing or wrong token).
"""
from __future__ import annotations

import json
import socket
import secrets
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_headers_conformance, response_schema_conformance, status_code_conformance)

from kvmesh.controller.openapi import openapi_document
from kvmesh.core.security import SecuritySettings

from .harness import ControllerThread

TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 20  # per operation and generation mode: ~30 operations x 20 examples stay within seconds
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerThread]:
    token_file = tmp_path_factory.mktemp("fuzz") / "token"
    token_file.write_text(TOKEN)
    with ControllerThread(security=SecuritySettings.load(token_file=token_file), max_tokens=4096) as c:
        yield c


def fetch_document(c: ControllerThread) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{c.http_port}/openapi.json", headers=AUTH)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(resp.read())


def test_document_covers_every_route(live: ControllerThread) -> None:
    assert live.server is not None
    doc = fetch_document(live)
    assert doc["openapi"].startswith("3.0")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.0 meta-schema
    served = {(verb.lower(), template) for verb, template, _ in live.server.gateway.routes}
    documented = {(verb, path) for path, ops in doc["paths"].items() for verb in ops}
    assert served <= documented
    assert documented - served == {("get", "/metrics"), ("get", "/healthz"), ("get", "/openapi.json")}
    # Shapes follow proto3 JSON: int64 tokens as number-or-string in, enums by name, maps as objects.
    schemas = doc["components"]["schemas"]
    tokens = schemas["kvmesh.api.controller.v1.CompressRequest.input"]["properties"]["tokens"]
    assert tokens["type"] == "array" and {s.get("type") for s in tokens["items"]["oneOf"]} == {"integer", "string"}
    status = schemas["kvmesh.api.controller.v1.CheckFinishResponse"]["properties"]["status"]
    assert "COMPLETED" in status["enum"] and status["type"] == "string"
    errors = schemas["kvmesh.api.controller.v1.HealthResponse"]["properties"]["errors"]
    assert errors == {"type": "object", "additionalProperties": {"type": "string"}}
    assert schemas["kvmesh.api.controller.v1.CompressRequest.input"]["additionalProperties"] is False
    assert doc == json.loads(json.dumps(openapi_document(live.server.rpcs)))


def operations(doc: dict[str, Any]) -> list[Any]:
    schema = schemathesis.openapi.from_dict(doc)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_every_operation(live: ControllerThread, mode: GenerationMode) -> None:
    doc = fetch_document(live)
    base_url = f"http://127.0.0.1:{live.http_port}"
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    ops = operations(doc)
    assert len(ops) == sum(len(v) for v in doc["paths"].values())
    without_negatives = []
    for op in ops:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, headers=AUTH, checks=checks, timeout=30)
        try:
            run()
        except Unsatisfiable:
            without_negatives.append(op.label)
    # Only liveness has no input at all, not even the token, to make invalid.
    assert without_negatives == ([] if mode == GenerationMode.POSITIVE else ["GET /healthz"])



def test_populated_answers_conform(live: ControllerThread) -> None:
    """Answers with data in them (a registered worker, a real event) match the document too: the
    fuzzer, with no agents, mostly sees empty lists and errors."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    live.register("fuzzed", 0, port=closed_port)
    schema = schemathesis.openapi.from_dict(fetch_document(live))
    base_url = f"http://127.0.0.1:{live.http_port}"

    def call(op_id: str, **kw: Any) -> Any:
        case = schema.find_operation_by_id(op_id).Case(media_type="application/json", **kw)
        response = case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS, timeout=30)
        assert response.status_code == 200, (op_id, response.text)
        return response

    body = call("Compress", body={"instance_id": "fuzzed", "method": "lossless", "location": "LocalCPUBackend"}).json()
    event_id = body["event_id"]
    assert body["num_tokens"] == 0
    assert call("CheckFinish", body={"event_id": event_id}).json()["status"] == "COMPLETED"
    assert call("GetEvent", path_parameters={"event_id": event_id}).json()["event"]["event_id"] == event_id
    lines = call("WatchEvent", path_parameters={"event_id": event_id}).text.splitlines()
    assert json.loads(lines[-1])["event"]["status"] == "COMPLETED"
    assert call("ListEvents", query={"limit": 5}).json()["events"]
    infos = call("QueryWorkerInfo", body={"instance_id": "fuzzed"}).json()["worker_infos"]
    assert infos[0]["port"] == closed_port
    assert call("QueryInstance", body={"ip": "127.0.0.1"}).json()["res"] == "fuzzed"
    health = call("Health", body={"instance_id": "fuzzed"}).json()
    assert health["healthy"] is False and health["error_codes"] == {"0": -1001}
    assert "kvmesh_" in call("Metrics").text
