"""The uvicorn wrapper: binding (port 0, errors), TCP_NODELAY on accepted connections, clean stop."""
from __future__ import annotations

import socket
import time

import pytest

from kvmesh.controller.http_server import bind

from .harness import ControllerThread


def test_bind_port_zero_and_taken_port() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(OSError, match=f"cannot bind HTTP to 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        sock.close()


def test_accepted_connections_are_tcp_so_asyncio_disables_nagle() -> None:
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with Nagle left on, an
    # answer written in two pieces (headers, body) waits for the client's delayed ACK (~40 ms).
    listener = bind("localhost", 0)
    try:
        listener.setblocking(True)
        assert listener.family == socket.AF_INET  # "localhost" binds IPv4 first
        with socket.create_connection(listener.getsockname()[:2], timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP
    finally:
        listener.close()


def test_controller_http_port_is_the_bound_one_and_stop_frees_it() -> None:
    c = ControllerThread()
    c.start()
    port = c.http_port
    assert port > 0 and c.http("GET", "/healthz").status == 200
    c.stop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again


def test_connections_over_the_cap_get_503() -> None:
    with ControllerThread(http_max_connections=3) as c:
        idle = [socket.create_connection(("127.0.0.1", c.http_port), timeout=5) for _ in range(3)]
        try:
            deadline = time.monotonic() + 10
            while c.http("GET", "/healthz").status != 503:  # the server has accepted all three
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while c.http("GET", "/healthz").status != 200:
            assert time.monotonic() < deadline, "the cap was never freed"
            time.sleep(0.01)
