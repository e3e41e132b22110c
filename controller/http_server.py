"""uvicorn serving an ASGI app inside the caller's running event loop (the controller's).

``uvicorn.Server.serve`` would take over signal handling and exit the process when it cannot bind;
here the socket is bound first (an OSError reaches the caller, port 0 gives a free port readable
as ``.port``), and the server's startup, housekeeping tick and shutdown are driven explicitly.
HTTP/1.1 parsing is h11's: malformed or duplicate ``Content-Length``, unsupported
``Transfer-Encoding`` and oversized headers are answered 400 before the app sees them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn
from starlette.types import ASGIApp

from kvmesh.core.tls import TlsFiles

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (the first address the name resolves to, IPv4 first)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it every answer written in two pieces waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {err.strerror or err}") from None
    return sock


class UvicornServer:
    """``await start()`` then ``await stop()``; ``port`` is the bound one."""

    def __init__(self, app: ASGIApp, host: str, port: int, *, max_header_bytes: int = 64 * 1024,
                 tls: TlsFiles | None = None, shutdown_grace: float = 5.0, keep_alive: float = 75.0,
                 max_connections: int | None = None) -> None:
        self._host = host
        self.port = port
        # HTTPS only when the files name a certificate (with a CA, clients must present one it signed).
        self.tls = tls if tls is not None and tls.server_enabled else None
        kwargs = {}
        if tls is not None and self.tls is not None:
            kwargs = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key, "ssl_ca_certs": tls.ca,
                      "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE}
        self._config = uvicorn.Config(
            app, host=host, port=port, http="h11", ws="none", lifespan="off", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, h11_max_incomplete_event_size=max_header_bytes,
            timeout_keep_alive=int(keep_alive), timeout_graceful_shutdown=int(max(1, shutdown_grace)),
            limit_concurrency=max_connections, **kwargs)
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._tick: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._config.load()  # builds the SSL context: a bad certificate or key fails here
        self._sock = bind(self._host, self.port)
        self.port = self._sock.getsockname()[1]
        server = uvicorn.Server(self._config)
        server.lifespan = self._config.lifespan_class(self._config)
        try:
            await server.startup(sockets=[self._sock])
        except BaseException:
            self._sock.close()
            raise
        self._server = server
        # The tick refreshes the Date header once a second and notices should_exit.
        self._tick = asyncio.create_task(server.main_loop(), name="uvicorn-tick")

    async def stop(self) -> None:
        """Stop accepting, let responses in flight end within the grace period, then close."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._tick is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None
        await server.shutdown(sockets=[self._sock] if self._sock is not None else None)
        self._sock = None
