"""The gateway's fast way of converting a JSON token list (``extend`` in C instead of ParseDict item by
item) gives the very message ParseDict gives, and leaves everything else to ParseDict's checks."""
from __future__ import annotations

import pytest
from google.protobuf import json_format

from kvmesh.controller.gateway import _build
from kvmesh.controller.metrics import ControllerMetrics
from kvmesh.controller.rpc_table import Rpc, build
from kvmesh.controller.service import ControllerService
from kvmesh.controller.settings import ControllerSettings
from kvmesh.errors import InvalidArgument

from .harness import ControllerThread


@pytest.fixture(scope="module")
def compress_rpc() -> Rpc:
    service = ControllerService(ControllerSettings(event_db=":memory:"), ControllerMetrics())
    return next(r for r in build(service.handlers(), service.metrics) if r.name == "Compress")


@pytest.mark.parametrize("tokens", [list(range(1024)), [0], [(1 << 63) - 1, 5], [-3, 4]])
def test_plain_integer_tokens_give_the_message_parsedict_gives(compress_rpc: Rpc, tokens: list[int]) -> None:
    fields = {"instance_id": "i", "method": "lossless", "location": "L", "tokens": tokens}
    expected = compress_rpc.request_cls()
    json_format.ParseDict(dict(fields), expected)
    assert _build(compress_rpc, dict(fields), {}, 1 << 20) == expected


@pytest.mark.parametrize("tokens", [[True, 1], [1.5], [1 << 63], [-(1 << 63) - 1], [1, "x"], [[1]]])
def test_anything_else_gets_parsedicts_400(compress_rpc: Rpc, tokens: list[object]) -> None:
    with pytest.raises(InvalidArgument):
        _build(compress_rpc, {"instance_id": "i", "tokens": tokens}, {}, 1 << 20)


def test_digit_strings_are_still_accepted_over_http() -> None:
    """proto3 JSON allows int64 as strings; those still go through ParseDict."""
    with ControllerThread() as c:
        assert c.post("/lookup", {"tokens": ["1", 2, "3"]}).status == 200
        r = c.post("/lookup", {"tokens": [1, True]})
        assert r.status == 400, r.body
