"""HTTP request bodies within bounds: the one mechanism of every kvmesh HTTP server (the controller's
gateway reads bodies with ``read_body``; the engine's OpenAI API wraps its app in ``BodyLimit``).

A body is counted while it streams in: a declared ``Content-Length`` over the limit is refused before a
byte of the body is read, a chunked (or lying) body as soon as what arrived crosses the limit, so a
body is never held whole beyond it. ``read_body`` also reserves every byte it holds from a
``BodyBudget`` shared by all connections (many concurrent uploads cannot add up past it: 429 with
``Retry-After``) and bounds the time the body may take (408).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .errors import DeadlineExceeded, KVMeshError, ResourceExhausted, TooBusy

ASGIApp = Callable[[dict[str, Any], Callable[..., Any], Callable[..., Any]], Any]


class BodyTooLarge(ResourceExhausted):
    """The body is over the per-request limit (HTTP 413)."""


class BodyTimeout(KVMeshError):
    """The body did not arrive in time (HTTP 408): a slow sender must not hold memory and a slot."""

    grpc_code = DeadlineExceeded.grpc_code
    http_status = 408


class BodyBudget:
    """Bytes of request bodies held in memory, across all connections, under one cap.

    Only the event loop touches it (no lock needed): reservations are taken while a body is read
    and given back when the request is done.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the body budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> None:
        """Take ``n`` bytes, or raise TooBusy when that would go over the cap."""
        if self.used + n > self.limit:
            raise TooBusy(f"the gateway holds {self.used} bytes of request bodies, and {n} more would go over "
                          f"its cap of {self.limit} bytes (--max-total-body-bytes); retry shortly", retry_after=1.0)
        self.used += n

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


@dataclass
class Reservation:
    """What one request holds of the budget; ``close()`` gives it all back."""

    budget: BodyBudget
    held: int = 0

    def take(self, n: int) -> None:
        self.budget.reserve(n)
        self.held += n

    def close(self) -> None:
        self.budget.release(self.held)
        self.held = 0


def declared_length(value: str | None) -> int | None:
    """The ``Content-Length`` as a number (uvicorn/h11 already refused malformed or conflicting ones)."""
    if value is None:
        return None
    return int(value)


async def read_body(chunks: AsyncIterator[bytes], declared: int | None, limit: int,
                    reservation: Reservation, timeout: float) -> bytes:
    """The whole body, refused with BodyTooLarge as soon as it is known to be over ``limit``.

    A declared length over the limit is refused before anything is read; what arrives is counted
    and reserved from the shared budget piece by piece (what is really held, so a client that only
    announces a big body holds nothing), and the whole body must arrive within ``timeout`` seconds.
    """
    if over_limit(declared, limit):
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes "
                           "(--max-body-bytes)")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for piece in chunks:
                if not piece:
                    continue
                size += len(piece)
                if size > limit:
                    raise BodyTooLarge(f"request body is over the limit of {limit} bytes (--max-body-bytes)")
                reservation.take(len(piece))
                parts.append(piece)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g} s ({size} bytes came)") from None
    return b"".join(parts)


def over_limit(declared: int | None, limit: int) -> bool:
    """True when a declared ``Content-Length`` is already over ``limit`` (refuse before reading)."""
    return declared is not None and declared > limit


class BodyLimit:
    """ASGI middleware: a body over ``max_body_bytes`` is refused with ``refuse(limit)`` (an ASGI app,
    e.g. the server's 413 in its own error shape) at once when ``Content-Length`` says so, else the
    ``over()`` exception is raised from ``receive`` as soon as the bytes read pass the limit (FastAPI
    and Starlette answer an HTTP exception raised while the body is read)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, *, refuse: Callable[[int], ASGIApp],
                 over: Callable[[], Exception]) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._refuse = refuse
        self._over = over

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        length = int(declared) if declared is not None and declared.isdigit() else None
        if over_limit(length, self.max_body_bytes):
            await self._refuse(self.max_body_bytes)(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._over()
            return message  # type: ignore[no-any-return]

        await self.app(scope, counting_receive, send)
