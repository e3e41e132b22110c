"""Request bodies of the HTTP gateway: read within bounds, parsed without stalling the event loop.

A body is counted while it streams in: a declared ``Content-Length`` over the limit is refused before
a byte of the body is read, a chunked body as soon as it crosses the limit. Every byte held in memory
is also reserved from one budget shared by all connections, so that many concurrent uploads cannot
add up past it (the gateway answers 429 with ``Retry-After`` then).

Big bodies are parsed in a worker thread by ``parse_json_object``: it walks objects and arrays in
Python (each scalar decoded by the C scanner), so the thread gives the GIL back every few
milliseconds instead of holding it for a whole ``json.loads`` (1 s for 20 MB), and it stops counting
``tokens`` as soon as there are more than the limit, before the rest is decoded.
"""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvmesh.errors import DeadlineExceeded, InvalidArgument, KVMeshError, ResourceExhausted, TooBusy

# Arrays and objects deeper than this are refused (json.loads would recurse up to ~1,000 levels and
# then raise RecursionError); no kvmesh message nests more than a few levels.
MAX_JSON_DEPTH = 64

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


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
    if declared is not None and declared > limit:
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


class TooManyTokens(ResourceExhausted):
    """More tokens than ``--max-tokens`` (HTTP 413), found before the whole body was decoded."""


class _Walker:
    """A JSON object decoded value by value (see the module docstring for why)."""

    def __init__(self, text: str, max_tokens: int | None) -> None:
        self.text = text
        self.max_tokens = max_tokens

    def skip(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def fail(self, what: str, i: int) -> InvalidArgument:
        return InvalidArgument(f"malformed JSON body: {what} at char {i}")

    def value(self, i: int, depth: int, key: str | None) -> tuple[object, int]:
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        ch = self.text[i:i + 1]
        if ch == "{":
            return self.obj(i + 1, depth + 1)
        if ch == "[":
            return self.array(i + 1, depth + 1, key)
        try:
            return _DECODER.scan_once(self.text, i)
        except StopIteration:
            raise self.fail("expecting a value", i) from None
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"malformed JSON body: {err}") from None

    def obj(self, i: int, depth: int, top: bool = False) -> tuple[dict[str, object], int]:
        out: dict[str, object] = {}
        i = self.skip(i)
        if self.text[i:i + 1] == "}":
            return out, i + 1
        while True:
            if self.text[i:i + 1] != '"':
                raise self.fail("expecting a property name in double quotes", i)
            key, i = self.value(i, depth, None)
            i = self.skip(i)
            if self.text[i:i + 1] != ":":
                raise self.fail("expecting ':'", i)
            # Only the top-level "tokens" is the request's token list.
            out[key], i = self.value(self.skip(i + 1), depth, key if top else None)  # type: ignore[index]
            i = self.skip(i)
            ch = self.text[i:i + 1]
            if ch == "}":
                return out, i + 1
            if ch != ",":
                raise self.fail("expecting ',' or '}'", i)
            i = self.skip(i + 1)

    def array(self, i: int, depth: int, key: str | None) -> tuple[list[object], int]:
        out: list[object] = []
        limit = self.max_tokens if key == "tokens" else None
        i = self.skip(i)
        if self.text[i:i + 1] == "]":
            return out, i + 1
        while True:
            item, i = self.value(i, depth, None)
            out.append(item)
            if limit is not None and len(out) > limit:
                raise TooManyTokens(f"more than {limit} tokens: over the limit of {limit} (--max-tokens)")
            i = self.skip(i)
            ch = self.text[i:i + 1]
            if ch == "]":
                return out, i + 1
            if ch != ",":
                raise self.fail("expecting ',' or ']'", i)
            i = self.skip(i + 1)


def parse_json_object(body: bytes, max_tokens: int | None = None) -> dict[str, object]:
    """The body as a JSON object, in small steps (for a worker thread); InvalidArgument when it is
    not one, TooManyTokens as soon as its top-level ``tokens`` has more than ``max_tokens`` items."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"malformed JSON body: not UTF-8 ({err.reason} at byte {err.start})") from None
    walker = _Walker(text, max_tokens)
    i = walker.skip(0)
    if text[i:i + 1] != "{":
        kind = "empty" if i >= len(text) else "not an object"
        raise InvalidArgument(f"the JSON body must be an object, got {kind}")
    out, i = walker.obj(i + 1, 1, top=True)
    i = walker.skip(i)
    if i != len(text):
        raise walker.fail("extra data after the object", i)
    return out
