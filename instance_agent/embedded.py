"""``EmbeddedAgent``: an ``InstanceAgent`` on a thread of its own, with blocking thread-safe methods.

For engines that are not asyncio programs (the embedded engine, vLLM's connector).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .config import AgentConfig
from .instance import InstanceAgent


class EmbeddedAgent:
    """An ``InstanceAgent`` on its own thread and event loop, with blocking thread-safe methods.

    For engines that are not asyncio programs: ``start()`` returns once the gRPC server is up (and
    raises what stopped it otherwise); every method may be called from any thread.
    """

    def __init__(self, config: AgentConfig, worker_id: int = 0, **kwargs: Any) -> None:
        self.agent = InstanceAgent(config, worker_id, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.call_timeout = 600.0

    def start(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            raise RuntimeError("agent already started")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.agent.start())
            except BaseException as err:  # hand the failure to start()'s caller
                started.set_exception(err)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"kvmesh-agent-{self.agent.worker_id}", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except BaseException:
            self._thread.join(5)
            self._thread = None
            raise

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self.agent.stop(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> EmbeddedAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("agent not started")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(self.call_timeout if timeout is None else timeout)

    def store(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None) -> int:
        """Store every chunk of ``tokens`` not yet stored; returns how many tokens were newly stored."""
        return int(self._call(self.agent.store(tokens, kv, location)))

    def retrieve(self, tokens: Sequence[int], location: str | None = None) -> tuple[int, torch.Tensor | None]:
        """The longest stored prefix of ``tokens`` and its KV, decoded ([2, L, n, C]); (0, None) on a miss."""
        n, kv = self._call(self.agent.retrieve(tokens, location))
        return int(n), kv

    def lookup(self, tokens: Sequence[int], location: str | None = None) -> int:
        return int(self._call(self.agent.lookup(tokens, location)))

    @property
    def grpc_port(self) -> int | None:
        return self.agent.grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self.agent.metrics_port

    @property
    def config(self) -> AgentConfig:
        return self.agent.config


__all__ = ["EmbeddedAgent"]
