"""Request bodies of the HTTP gateway: read within bounds (``kvmesh.core.http_body``, the mechanism the
engine's API shares: counted while streaming, one memory budget over all connections, a time bound),
and parsed without stalling the event loop.

Big bodies are parsed in a worker thread by ``parse_json_object``: it walks objects and arrays in
Python (each scalar decoded by the C scanner), so the thread gives the GIL back every few
milliseconds instead of holding it for a whole ``json.loads`` (1 s for 20 MB), and it stops counting
``tokens`` as soon as there are more than the limit, before the rest is decoded.
"""
from __future__ import annotations

import json
import re

from kvmesh.core.http_body import BodyBudget, BodyTimeout, BodyTooLarge, Reservation, declared_length, read_body
from kvmesh.errors import InvalidArgument, ResourceExhausted

__all__ = ["BodyBudget", "BodyTimeout", "BodyTooLarge", "Reservation", "declared_length", "read_body",
           "MAX_JSON_DEPTH", "TooManyTokens", "parse_json_object"]

# Arrays and objects deeper than this are refused (json.loads would recurse up to ~1,000 levels and
# then raise RecursionError); no kvmesh message nests more than a few levels.
MAX_JSON_DEPTH = 64

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


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
