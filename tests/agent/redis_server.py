"""A real ``redis-server`` for the remote-tier tests: on a free loopback port, no persistence,
ready once PING answers; ``kill()`` for outage tests. Shared with tests/integration."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import free_port, tool_path


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = tool_path("redis-server")
        if binary is None:
            pytest.fail("redis-server not found (scripts/setup.sh puts Debian's into .tools/bin)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "redis.log", "wb")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(redis.RedisError):
                if self.client.ping():
                    return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING in {timeout}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self.client.close()
        self.log.close()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    try:
        yield server
    finally:
        server.stop()
