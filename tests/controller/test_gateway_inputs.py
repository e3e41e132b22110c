"""Bad input over real HTTP: every answer a 4xx with a JSON error that says what was wrong."""
from __future__ import annotations

import http.client
import socket

import pytest

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.controller.gateway import message_to_json

from .harness import ControllerThread

SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]


def assert_error(r, status: int, *needles: str) -> None:  # noqa: ANN001
    assert r.status == status, (r.status, r.body)
    err = r.body["error"]
    assert err["code"] == status
    assert err["message"] and r.body["detail"] == err["message"]
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])


def test_malformed_json_is_400(controller: ControllerThread) -> None:
    assert_error(controller.post("/compress", raw=b'{"instance_id": "x",'), 400, "malformed JSON")
    assert_error(controller.post("/lookup", raw=b"\xff\xfe"), 400, "malformed JSON")


def test_body_must_be_an_object(controller: ControllerThread) -> None:
    assert_error(controller.post("/lookup", raw=b"[1, 2, 3]"), 400, "must be an object")


def test_unknown_field_is_400_naming_valid_fields(controller: ControllerThread) -> None:
    r = controller.post("/compress", {"instance_idd": "x", "tokens": [1]})
    assert_error(r, 400, "instance_idd", "instance_id, method, location, tokens")


@pytest.mark.parametrize("tokens, needle", [
    ("abc", "tokens"),
    ([1, "x"], "tokens"),
    ([1.5], "1.5"),
    ([True], "Bool"),
    ([{"a": 1}], "tokens"),
])
def test_wrong_token_types_are_400(controller: ControllerThread, tokens: object, needle: str) -> None:
    assert_error(controller.post("/lookup", {"tokens": tokens}), 400, needle)


def test_negative_and_huge_tokens_are_400(controller: ControllerThread) -> None:
    assert_error(controller.post("/lookup", {"tokens": [1, -5]}), 400, "tokens[1] is -5")
    assert_error(controller.post("/lookup", {"tokens": [2**63]}), 400, "out of range")
    # The largest valid token passes validation.
    assert controller.post("/lookup", {"tokens": [2**63 - 1]}).status == 200


def test_too_many_tokens_is_413(controller: ControllerThread) -> None:
    assert_error(controller.post("/lookup", {"tokens": list(range(1001))}), 413, "1001 tokens", "1000")
    assert controller.post("/lookup", {"tokens": list(range(1000))}).status == 200


def test_body_over_limit_is_413(controller: ControllerThread) -> None:
    r = controller.post("/lookup", raw=b'{"tokens": [' + b"1," * 200_000 + b"1]}")
    assert_error(r, 413, "over the limit")


def test_wrong_field_types_are_400(controller: ControllerThread) -> None:
    assert_error(controller.post("/health", {"instance_id": 5}), 400, "instance_id")
    assert_error(controller.post("/query_worker_info", {"instance_id": "all", "worker_ids": "0"}), 400, "worker_ids")
    assert_error(controller.post("/move", {"old_position": "a"}), 400, "old_position")


def test_missing_required_fields_are_400(controller: ControllerThread) -> None:
    assert_error(controller.post("/health", {}), 400, "instance_id is required")
    assert_error(controller.post("/check_finish", {}), 400, "event_id is required")
    assert_error(controller.post("/query_instance", {}), 400, "ip is required")
    assert_error(controller.post("/query_worker_info", {}), 400, "instance_id is required")
    assert_error(controller.post("/compress", {"method": "lossless", "location": "LocalCPUBackend"}), 400,
                 "instance_id is required")


def test_unknown_instance_and_event_are_404(controller: ControllerThread) -> None:
    body = {"instance_id": "ghost", "method": "cachegen", "location": "LocalCPUBackend", "tokens": SEED_TOKENS}
    for path in ("/compress", "/decompress", "/pin", "/unpin", "/clear"):
        assert_error(controller.post(path, body if path in ("/compress", "/decompress") else
                                     {k: v for k, v in body.items() if k != "method"}), 404, "ghost")
    assert_error(controller.post("/health", {"instance_id": "ghost"}), 404, "ghost")
    assert_error(controller.post("/query_worker_info", {"instance_id": "ghost"}), 404, "ghost")
    assert_error(controller.post("/query_instance", {"ip": "10.9.9.9"}), 404, "10.9.9.9")
    assert_error(controller.post("/check_finish", {"event_id": "CompressNope"}), 404, "CompressNope")
    assert_error(controller.http("GET", "/events/CompressNope"), 404, "CompressNope")
    assert_error(controller.http("GET", "/events/CompressNope/watch"), 404, "CompressNope")
    assert_error(controller.post("/move", {"old_position": ["ghost", "LocalCPUBackend"],
                                           "new_position": ["ghost2", "LocalCPUBackend"], "tokens": [1]}), 404, "ghost")


def test_unknown_method_and_location_are_400_naming_valid_ones(controller: ControllerThread) -> None:
    controller.register("inst", 0, methods=("lossless", "cachegen"), locations=("LocalCPUBackend", "LocalDiskBackend"))
    controller.register("inst", 1, methods=("lossless", "cachegen", "int8"), locations=("LocalCPUBackend",))
    r = controller.post("/compress", {"instance_id": "inst", "method": "zstd", "location": "LocalCPUBackend",
                                      "tokens": [1, 2]})
    # Valid means valid on every worker of the instance: int8 is on one only.
    assert_error(r, 400, "'zstd'", "valid methods: cachegen, lossless")
    r = controller.post("/compress", {"instance_id": "inst", "method": "cachegen", "location": "Nowhere",
                                      "tokens": [1, 2]})
    assert_error(r, 400, "'Nowhere'", "valid locations: LocalCPUBackend")
    r = controller.post("/compress", {"instance_id": "inst", "location": "LocalCPUBackend", "tokens": [1]})
    assert_error(r, 400, "method empty", "valid methods")
    r = controller.post("/pin", {"instance_id": "inst", "location": "LocalDiskBackend", "tokens": [1]})
    assert_error(r, 400, "LocalDiskBackend", "valid locations: LocalCPUBackend")
    r = controller.post("/move", {"old_position": ["inst", "LocalCPUBackend"], "new_position": ["inst", "Tape"],
                                  "tokens": [1]})
    assert_error(r, 400, "'Tape'", "valid locations")
    r = controller.post("/move", {"old_position": ["inst", "LocalCPUBackend"],
                                  "new_position": ["inst", "LocalCPUBackend"], "tokens": [1]})
    assert_error(r, 400, "the same")


def test_unreachable_agent_is_reported_not_hidden(controller: ControllerThread) -> None:
    # A registered worker whose port has nothing listening (a real closed port, not a fake).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    controller.register("inst", 0, port=closed_port)
    r = controller.post("/compress", {"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend",
                                      "tokens": [1, 2, 3]})
    assert_error(r, 503, "worker 0", "Lookup")
    r = controller.post("/health", {"instance_id": "inst"})
    assert r.status == 200
    assert r.body["healthy"] is False
    assert r.body["error_codes"] == {"0": -1001}
    assert "health call" in r.body["errors"]["0"]


def test_empty_tokens_compress_nothing_like_lmcache(controller: ControllerThread) -> None:
    controller.register("inst", 0)
    r = controller.post("/compress", {"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend"})
    assert r.status == 200
    assert r.body["num_tokens"] == 0 and r.body["event_id"].startswith("Compress")
    r = controller.post("/check_finish", {"event_id": r.body["event_id"]})
    assert r.body["status"] == "COMPLETED"


def test_query_parameters_of_get_routes(controller: ControllerThread) -> None:
    assert controller.http("GET", "/events?limit=3").status == 200
    assert_error(controller.http("GET", "/events?limit=x"), 400, "limit")
    assert_error(controller.http("GET", "/events?limit=-1"), 400, "limit must be >= 0")
    assert_error(controller.http("GET", "/events?color=red"), 400, "color", "limit, instance_id")


def test_layout_info_numbers_are_integers() -> None:
    resp = pb.LookupResponse(event_id="e")
    resp.layout_info["inst"].extend(["LocalCPUBackend", 12])
    out = message_to_json(resp)
    assert out["layout_info"] == {"inst": ["LocalCPUBackend", 12]}
    assert isinstance(out["layout_info"]["inst"][1], int)


def test_expect_continue_and_keep_alive(controller: ControllerThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", controller.http_port, timeout=10)
    try:
        for _ in range(3):  # one connection, several requests
            conn.request("POST", "/lookup", body=b'{"tokens": [1, 2]}',
                         headers={"Content-Type": "application/json", "Expect": "100-continue"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except ConnectionError:
            pass  # the server may answer and close before reading everything
        chunks = []
        while True:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            chunks.append(piece)
    return b"".join(chunks)


def test_malformed_request_line_and_huge_headers(controller: ControllerThread) -> None:
    # Framing is uvicorn's (h11): a malformed request is a 400 before the gateway sees it.
    data = raw_exchange(controller.http_port, b"NONSENSE\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request" in data
    # Headers over --max-header-bytes: h11 refuses them while they stream in (400), the gateway
    # when they arrived in one read (431 naming the limit).
    data = raw_exchange(controller.http_port, b"GET /events HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
                        + b"\r\n\r\n")
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), data[:200]
    if data.startswith(b"HTTP/1.1 431"):
        assert b"headers of" in data and b"65536" in data
    data = raw_exchange(controller.http_port, b"POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")
