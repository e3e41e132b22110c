"""``InstanceAgent``: the lifecycle, the chunk operations and the transfers composed into one agent.

This is the composition root: it alone knows the servicer (``service``) and the controller link,
so that no domain module imports them.
"""
from __future__ import annotations

from typing import Any

import grpc

from .transfers import Transfers


class InstanceAgent(Transfers):
    """The agent of one worker: storage locations, codecs, the gRPC service and the controller link."""

    async def _build_server(self) -> tuple[grpc.aio.Server, int, int | None]:
        from .service import build_server

        return await build_server(self)

    def _make_link(self) -> Any:
        from .controller_link import ControllerLink

        return ControllerLink(self)


__all__ = ["InstanceAgent"]
