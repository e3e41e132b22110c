"""The gRPC face: health and reflection services, and domain errors as gRPC status codes."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb

from .harness import ControllerThread


def test_health_service_serves_overall_and_controller(controller: ControllerThread) -> None:
    with grpc.insecure_channel(controller.grpc_target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvmesh.api.controller.v1.Controller"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(controller: ControllerThread) -> None:
    with grpc.insecure_channel(controller.grpc_target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"kvmesh.api.controller.v1.Controller", "grpc.health.v1.Health"} <= names


def test_domain_errors_map_to_status_codes(controller: ControllerThread) -> None:
    cases = [
        (lambda: controller.stub.GetEvent(pb.GetEventRequest(event_id="Nope"), timeout=5), grpc.StatusCode.NOT_FOUND),
        (lambda: list(controller.stub.WatchEvent(pb.WatchEventRequest(event_id="Nope"), timeout=5)),
         grpc.StatusCode.NOT_FOUND),
        (lambda: controller.stub.Lookup(pb.LookupRequest(tokens=[-1]), timeout=5), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: controller.stub.Lookup(pb.LookupRequest(tokens=list(range(1001))), timeout=5),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        (lambda: controller.stub.Compress(pb.CompressRequest(instance_id="ghost", method="x", location="y"),
                                          timeout=5), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code
        assert err.value.details()


def test_list_events_filters_by_instance(controller: ControllerThread) -> None:
    controller.register("a", 0)
    controller.register("b", 0)
    for inst in ("a", "b", "a"):
        controller.stub.Compress(pb.CompressRequest(instance_id=inst, method="lossless", location="LocalCPUBackend"),
                                 timeout=5)
    resp = controller.stub.ListEvents(pb.ListEventsRequest(instance_id="a"), timeout=5)
    assert [e.instance_id for e in resp.events] == ["a", "a"]
    assert len(controller.stub.ListEvents(pb.ListEventsRequest(), timeout=5).events) == 3
