"""TLS and mutual TLS between every process, with certificates from scripts/make_certs.sh: the right
CA and client certificate get in, a wrong CA, a missing client certificate or plaintext do not;
controller and agents talk over mTLS with the token."""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.core.channels import channel
from kvmesh.core.security import SecuritySettings
from tests.controller.harness import ControllerThread
from tests.security.conftest import TOKEN, AgentThread, agent_config, mtls, poll
from tests.support import REPO


@pytest.fixture(scope="module")
def controller(certs: Path) -> Iterator[ControllerThread]:
    with ControllerThread(security=mtls(certs)) as c:
        yield c


def _query(target: str, security: SecuritySettings) -> grpc.StatusCode:
    with channel(target, security) as ch:
        try:
            controller_pb2_grpc.ControllerStub(ch).ListEvents(pb.ListEventsRequest(), timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _tls_target(c: ControllerThread) -> str:
    return f"localhost:{c.server.grpc_port}"  # a name the certificate holds


def test_right_ca_and_client_certificate_get_in(controller: ControllerThread, certs: Path) -> None:
    assert _query(_tls_target(controller), mtls(certs, who="client")) == grpc.StatusCode.OK
    assert _query(f"127.0.0.1:{controller.server.grpc_port}", mtls(certs, who="server")) == grpc.StatusCode.OK


def test_mtls_still_needs_the_token(controller: ControllerThread, certs: Path) -> None:
    assert _query(_tls_target(controller), mtls(certs, who="client", token=None)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_certificate_of_another_ca_is_refused(controller: ControllerThread, certs: Path,
                                                       other_certs: Path) -> None:
    # The impostor trusts the right CA (it can see the server) but shows a certificate of its own CA.
    impostor = mtls(other_certs, who="client", ca=certs)
    assert _query(_tls_target(controller), impostor) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_refuses_the_server(controller: ControllerThread, other_certs: Path) -> None:
    assert _query(_tls_target(controller), mtls(other_certs, who="client")) == grpc.StatusCode.UNAVAILABLE


def test_no_client_certificate_is_refused(controller: ControllerThread, certs: Path) -> None:
    only_ca = SecuritySettings(token=TOKEN, tls_ca=str(certs / "ca.crt"))
    assert _query(_tls_target(controller), only_ca) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused(controller: ControllerThread) -> None:
    assert _query(_tls_target(controller), SecuritySettings(token=TOKEN)) == grpc.StatusCode.UNAVAILABLE


def test_health_over_mtls_needs_no_token(controller: ControllerThread, certs: Path) -> None:
    with channel(_tls_target(controller), mtls(certs, who="client", token=None)) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_server_only_tls_without_a_ca(certs: Path) -> None:
    server_tls = SecuritySettings(token=TOKEN, tls_cert=str(certs / "server.crt"), tls_key=str(certs / "server.key"))
    with ControllerThread(security=server_tls) as c:
        client = SecuritySettings(token=TOKEN, tls_ca=str(certs / "ca.crt"))
        assert _query(_tls_target(c), client) == grpc.StatusCode.OK
        assert _query(_tls_target(c), SecuritySettings(token=TOKEN)) == grpc.StatusCode.UNAVAILABLE


def test_controller_and_agent_over_mtls(controller: ControllerThread, certs: Path,
                                        agent_thread: Callable[..., AgentThread], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    agent_thread(agent_config(lmcache_instance_id="sec_mtls", enable_controller=True,
                              controller_pull_url=_tls_target(controller),
                              extra_config={"auth_token_file": str(token_file),
                                            "tls_cert_file": str(certs / "server.crt"),
                                            "tls_key_file": str(certs / "server.key"),
                                            "tls_ca_file": str(certs / "ca.crt")}))
    with channel(_tls_target(controller), mtls(certs, who="client")) as ch:
        stub = controller_pb2_grpc.ControllerStub(ch)

        def registered() -> bool:
            try:
                return bool(stub.QueryWorkerInfo(pb.QueryWorkerInfoRequest(instance_id="sec_mtls"),
                                                 timeout=10).worker_infos)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                return False

        poll("the agent registers over mTLS", registered)
        health = stub.Health(pb.HealthRequest(instance_id="sec_mtls"), timeout=10)
    assert health.healthy, health  # the controller's channel to the agent is mTLS with the token too


def test_make_certs_refuses_to_overwrite_a_ca(certs: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "exists" in proc.stderr
