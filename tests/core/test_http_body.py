"""The one body-bound mechanism (kvmesh.core.http_body) on its own: the controller's reader and the
engine's middleware refuse a declared length over the limit before reading, and a body without one as
soon as it passes the limit; the shared budget gives back what a request held."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from kvmesh.core.http_body import BodyBudget, BodyLimit, BodyTooLarge, Reservation, read_body
from kvmesh.errors import TooBusy


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def test_read_body_counts_and_reserves() -> None:
    budget = BodyBudget(10)
    held = Reservation(budget)
    assert asyncio.run(read_body(pieces(b"abc", b"", b"de"), None, 8, held, 5.0)) == b"abcde"
    assert budget.used == 5
    held.close()
    assert budget.used == 0
    with pytest.raises(BodyTooLarge):  # declared: refused before a byte is read
        asyncio.run(read_body(pieces(), 9, 8, Reservation(budget), 5.0))
    with pytest.raises(BodyTooLarge):  # undeclared: refused once it passes the limit
        asyncio.run(read_body(pieces(b"12345", b"6789"), None, 8, Reservation(budget), 5.0))
    with pytest.raises(TooBusy):  # the budget over all requests
        other = Reservation(budget)
        other.take(8)
        asyncio.run(read_body(pieces(b"abc"), None, 8, Reservation(budget), 5.0))


def test_body_limit_middleware() -> None:
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    def refuse(limit: int) -> JSONResponse:
        return JSONResponse({"error": f"over {limit}"}, status_code=413)

    app = Starlette(routes=[Route("/", echo, methods=["POST"])])
    app.add_middleware(BodyLimit, max_body_bytes=8, refuse=refuse, over=lambda: HTTPException(413))
    with TestClient(app) as client:
        assert client.post("/", content=b"12345678").text == "8"
        r = client.post("/", content=b"123456789")
        assert r.status_code == 413 and r.json() == {"error": "over 8"}  # declared: the server's own answer

        def chunked() -> Iterator[bytes]:
            yield b"12345"
            yield b"6789"
        assert client.post("/", content=chunked()).status_code == 413  # counted while it streams
    with pytest.raises(ValueError):
        BodyLimit(app, 0, refuse=refuse, over=lambda: HTTPException(413))
