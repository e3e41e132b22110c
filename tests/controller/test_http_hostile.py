"""Hostile HTTP input against a real controller (uvicorn on loopback): each case gets a 4xx or a
bounded, clean answer, and other callers keep being served meanwhile."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.controller.gateway import Gateway, GatewayLimits, error_response
from kvmesh.controller.http_body import MAX_JSON_DEPTH, parse_json_object
from kvmesh.controller.http_server import UvicornServer
from kvmesh.controller.metrics import ControllerMetrics
from kvmesh.controller.rpc_table import SERVICE, build
from kvmesh.errors import InvalidArgument, TooBusy

from .harness import ControllerThread
from .test_gateway_inputs import assert_error, raw_exchange


def head(method: str, path: str, *lines: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: kvmesh\r\nConnection: close\r\n"
            + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode("latin-1")


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer (headers and its Content-Length body) from a socket left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    headers, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, data
        body += piece
    return headers + b"\r\n\r\n" + body


@pytest.mark.parametrize("name, data", [
    ("non-ASCII digit length", "POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               "Content-Length: \u00b2\r\n\r\n{}".encode()),
    ("two different lengths", head("POST", "/lookup", "Content-Type: application/json", "Content-Length: 2",
                                   "Content-Length: 5") + b"{}"),
    ("gzip transfer coding", head("POST", "/lookup", "Content-Type: application/json", "Transfer-Encoding: gzip",
                                  "Content-Length: 2") + b"{}"),
    ("length and chunked", head("POST", "/lookup", "Content-Type: application/json", "Transfer-Encoding: chunked",
                                "Content-Length: 2") + b"2\r\n{}\r\n0\r\n\r\n"),
    ("gzip then chunked", head("POST", "/lookup", "Content-Type: application/json",
                               "Transfer-Encoding: gzip, chunked") + b"2\r\n{}\r\n0\r\n\r\n"),
    ("xchunked", head("POST", "/lookup", "Content-Type: application/json", "Transfer-Encoding: xchunked")
     + b"2\r\n{}\r\n0\r\n\r\n"),
    ("space before colon", head("POST", "/lookup", "Content-Type: application/json", "Content-Length : 2") + b"{}"),
    ("obsolete line folding", head("POST", "/lookup", "Content-Type: application/json", "Content-Length: 2",
                                   " 0") + b"{}"),
    ("negative length", head("POST", "/lookup", "Content-Type: application/json", "Content-Length: -1")),
    ("no Host in HTTP/1.1", b"GET /events HTTP/1.1\r\nConnection: close\r\n\r\n"),
])
def test_request_smuggling_shapes_are_400(controller: ControllerThread, name: str, data: bytes) -> None:
    answer = raw_exchange(controller.http_port, data)
    assert answer.startswith(b"HTTP/1.1 400"), (name, answer[:300])
    # The server is still fine for the next caller.
    assert controller.http("GET", "/events").status == 200


def test_chunked_body_is_read_and_bounded(controller: ControllerThread) -> None:
    ok = raw_exchange(controller.http_port, head("POST", "/lookup", "Content-Type: application/json",
                                                 "Transfer-Encoding: chunked") + b'f\r\n{"tokens": [1]}\r\n0\r\n\r\n')
    assert ok.startswith(b"HTTP/1.1 200"), ok[:300]
    piece = b"1," * 50_000  # 100 kB chunks: the limit is 256 kB
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(4))
    big = raw_exchange(controller.http_port, head("POST", "/lookup", "Content-Type: application/json",
                                                  "Transfer-Encoding: chunked") + b'c\r\n{"tokens": [\r\n' + body)
    assert big.startswith(b"HTTP/1.1 413") and b"over the limit of 262144 bytes" in big, big[:300]


def test_declared_length_over_limit_is_413_before_the_body(controller: ControllerThread) -> None:
    # Only the headers are sent: the answer comes without waiting for 10 GB.
    with socket.create_connection(("127.0.0.1", controller.http_port), timeout=10) as s:
        s.sendall(head("POST", "/compress", "Content-Type: application/json", "Content-Length: 10000000000")
                  .replace(b"Connection: close\r\n", b""))
        answer = read_answer(s)
        assert s.recv(100) == b""  # too much to drain: the connection is closed after the answer
    assert answer.startswith(b"HTTP/1.1 413") and b"10000000000 bytes is over the limit" in answer
    assert b"connection: close" in answer.lower()


def test_a_modest_overflow_is_drained_and_the_connection_kept(controller: ControllerThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", controller.http_port, timeout=10)
    try:
        body = b'{"tokens": [' + b"1," * 200_000 + b"1]}"  # 400 kB, the limit is 256 kB
        conn.request("POST", "/lookup", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and b"over the limit" in resp.read()
        conn.request("POST", "/lookup", body=b'{"tokens": [1]}', headers={"Content-Type": "application/json"})
        resp = conn.getresponse()  # the same connection serves the next request
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("size", ["small", "big"])
def test_deeply_nested_json_is_400(controller: ControllerThread, size: str) -> None:
    pad = " " * (20_000 if size == "big" else 0)  # big bodies take the worker-thread parser
    r = controller.post("/lookup", raw=b'{"tokens": ' + b"[" * 1000 + b"]" * 1000 + pad.encode() + b"}")
    assert_error(r, 400, "nest")
    r = controller.post("/lookup", raw=b"[" * 1000 + b"]" * 1000 + pad.encode())
    assert r.status == 400, r.body


def test_bodies_must_be_json(controller: ControllerThread) -> None:
    body = json.dumps({"instance_id": "inst", "location": "LocalCPUBackend"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = controller.post("/clear", raw=body, headers={"Content-Type": ctype})
        assert_error(r, 415, ctype.split(";")[0], "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", controller.http_port, timeout=10)
    try:  # a body without any Content-Type
        conn.putrequest("POST", "/clear")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        assert resp.status == 415, resp.read()
    finally:
        conn.close()
    assert controller.post("/lookup", raw=b'{"tokens": [1]}',
                           headers={"Content-Type": "application/json; charset=utf-8"}).status == 200
    assert controller.post("/events", raw=b"", headers={"Content-Type": "text/plain"}).status == 405


def test_big_bodies_parse_in_a_thread_with_the_same_answers(controller: ControllerThread) -> None:
    tokens = list(range(999))
    pad = " " * 20_000
    r = controller.post("/lookup", raw=json.dumps({"tokens": tokens}).encode() + pad.encode())
    assert r.status == 200, r.body
    r = controller.post("/lookup", raw=json.dumps({"tokens": tokens + [1, 2]}).encode() + pad.encode())
    assert_error(r, 413, "more than 1000 tokens", "--max-tokens")
    r = controller.post("/lookup", raw=json.dumps({"tokens": list(range(1001))}).encode())  # small: exact count
    assert_error(r, 413, "1001 tokens is over the limit of 1000", "--max-tokens")
    r = controller.post("/lookup", raw=json.dumps({"tokens": [1, "x"]}).encode() + pad.encode())
    assert_error(r, 400, "tokens")
    r = controller.post("/lookup", raw=json.dumps({"tokenz": [1]}).encode() + pad.encode())
    assert_error(r, 400, "tokenz", "valid fields: tokens")
    r = controller.post("/lookup", raw=b'{"tokens": [1,}' + pad.encode())
    assert_error(r, 400, "malformed JSON")


def test_parse_json_object_matches_json_loads() -> None:
    doc = {"a": [1, -2.5, "x\u00e9", None, True, {"b": []}], "tokens": [3, 4], "c": {}, "d": "\"}"}
    assert parse_json_object(json.dumps(doc).encode(), max_tokens=2) == doc
    assert parse_json_object(json.dumps(doc, indent=2).encode()) == doc
    for bad in (b"", b"[]", b'{"a": 1} x', b'{"a" 1}', b'{"a": [1 2]}', b"{'a': 1}", b"\xff"):
        with pytest.raises(InvalidArgument):
            parse_json_object(bad)
    deep = b'{"a": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"
    with pytest.raises(InvalidArgument, match="deeper"):
        parse_json_object(deep)


def test_total_body_budget_answers_429() -> None:
    with ControllerThread(max_body_bytes=256 * 1024, max_total_body_bytes=300 * 1024) as c:
        assert c.server is not None
        slow = socket.create_connection(("127.0.0.1", c.http_port), timeout=10)
        try:
            # A slow upload has sent (and the gateway holds) 200 kB of its 250 kB, out of a 300 kB budget.
            start = b'{"tokens": [' + b"1," * 100_000
            slow.sendall(head("POST", "/lookup", "Content-Type: application/json", "Content-Length: 250000") + start)
            deadline = time.monotonic() + 10
            while c.sync(lambda: c.server.gateway.budget.used) < len(start):
                assert time.monotonic() < deadline, "the slow upload never arrived"
                time.sleep(0.01)
            r = c.post("/lookup", raw=b'{"tokens": [' + b"1," * 99_999 + b"1]}")
            assert_error(r, 429, "cap of 307200 bytes", "--max-total-body-bytes")
            assert r.headers["retry-after"] == "1"
            # Small requests still pass; the slow one, once complete, is answered and frees its share.
            assert c.post("/lookup", {"tokens": [1]}).status == 200
            slow.sendall(b"1" + b" " * (250_000 - len(start) - 3) + b"]}")
            assert read_answer(slow).startswith(b"HTTP/1.1 200")
        finally:
            slow.close()
        assert c.sync(lambda: c.server.gateway.budget.used) == 0
        assert c.post("/lookup", raw=b'{"tokens": [' + b"1," * 99_999 + b"1]}").status == 200


def test_a_body_that_never_completes_gets_408() -> None:
    with ControllerThread(http_body_timeout=0.5) as c:
        assert c.server is not None
        with socket.create_connection(("127.0.0.1", c.http_port), timeout=10) as s:
            s.sendall(head("POST", "/lookup", "Content-Type: application/json", "Content-Length: 1000")
                      .replace(b"Connection: close\r\n", b"") + b'{"tokens": [1,')
            started = time.monotonic()
            answer = read_answer(s)
            waited = time.monotonic() - started
            assert s.recv(100) == b""  # and the slow sender is disconnected
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer, answer[:300]
        assert waited < 5
        assert c.sync(lambda: c.server.gateway.budget.used) == 0


def test_too_busy_is_429_with_retry_after() -> None:
    resp = error_response(TooBusy("in-flight events are at their cap of 10", retry_after=2.5))
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "3"
    body = json.loads(resp.body)
    assert body["error"]["status"] == "RESOURCE_EXHAUSTED" and "cap of 10" in body["detail"]


@pytest.fixture
def busy_gateway() -> Iterator[int]:
    """A real uvicorn serving a gateway whose every handler answers TooBusy."""
    async def busy(request: object) -> object:
        raise TooBusy("the event table is full (10 in flight); retry later", retry_after=0.2)
    metrics = ControllerMetrics()
    gateway = Gateway(build({m.name: busy for m in SERVICE.methods}, metrics), metrics, GatewayLimits())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = UvicornServer(gateway.app, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        gateway.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_too_busy_over_http(busy_gateway: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", busy_gateway, timeout=10)
    try:
        conn.request("POST", "/compress", body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 429 and resp.getheader("Retry-After") == "1"
    assert "event table is full" in body["error"]["message"]


def test_a_20mb_compress_does_not_stall_other_callers() -> None:
    """While a 20 MB body (10M tokens) is uploaded and parsed, GET /events and a gRPC call on the same
    loop keep answering fast, and the big request gets its 413 without being fully converted."""
    body = (b'{"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend", "tokens": ['
            + b"1," * 10_000_000 + b"1]}")
    with ControllerThread(max_tokens=1 << 20) as c:
        result: dict[str, object] = {}

        def big() -> None:
            result["answer"] = c.post("/compress", raw=body, timeout=120)
            result["done"] = time.monotonic()

        uploader = threading.Thread(target=big)
        latencies: list[tuple[float, float]] = []  # (start, seconds), HTTP and gRPC alternating
        uploader.start()
        while uploader.is_alive():
            start = time.monotonic()
            assert c.http("GET", "/events", timeout=30).status == 200
            latencies.append((start, time.monotonic() - start))
            start = time.monotonic()
            c.stub.ListEvents(pb.ListEventsRequest(limit=1), timeout=30)
            latencies.append((start, time.monotonic() - start))
        uploader.join()
        answer = result["answer"]
        assert_error(answer, 413, "more than 1048576 tokens")
        during = [sec for start, sec in latencies if start + sec < result["done"]]  # type: ignore[operator]
        assert len(during) >= 6, latencies
        print(f"{len(during)} calls during the upload, slowest {max(during) * 1000:.0f} ms")
        assert max(during) < 1.0, f"a call took up to {max(during):.3f} s during the 20 MB upload"
