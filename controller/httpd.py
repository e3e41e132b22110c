"""A small HTTP/1.1 server on asyncio streams, enough for a JSON gateway and a metrics page.

Requests: a request line, headers (bounded in size), a ``Content-Length`` body (bounded; chunked
request bodies are refused with 411), ``Expect: 100-continue`` honoured, keep-alive by default in
HTTP/1.1. Responses: a whole body with ``Content-Length``, or a stream sent with chunked transfer
encoding (for newline-delimited JSON). Protocol errors are answered with a JSON error body.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT = 75.0
_BODY_TIMEOUT = 60.0
_MAX_HEADERS = 200
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 16 * 1024 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # When set, the body is streamed from it (chunked encoding) and ``body`` is ignored.
    stream: AsyncIterator[bytes] | None = None


def error_body(status: int, message: str, grpc_code: str = "") -> bytes:
    """kvmesh's JSON error: ``{"error": {"code", "status", "message"}, "detail"}``.

    ``detail`` repeats the message in the shape LMCache's (FastAPI) clients read.
    """
    err = {"code": status, "status": grpc_code or HTTPStatus(status).phrase.upper().replace(" ", "_"),
           "message": message}
    return json.dumps({"error": err, "detail": message}).encode()


def json_error(status: int, message: str, grpc_code: str = "", headers: dict[str, str] | None = None) -> Response:
    return Response(status=status, body=error_body(status, message, grpc_code), headers=dict(headers or {}))


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0: a free one, see ``.port`` after ``start``)."""

    def __init__(self, handler: Handler, host: str, port: int, *, max_header_bytes: int = 64 * 1024,
                 max_body_bytes: int = 64 * 1024 * 1024) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self._host, self._port, limit=self._max_header)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            keep_alive = True
            while keep_alive:
                try:
                    request = await self._read_request(reader, writer)
                except _BadRequest as bad:
                    await self._write(writer, json_error(bad.status, bad.message), "HTTP/1.1", keep_alive=False)
                    await self._linger(reader, writer)
                    break
                if request is None:
                    break
                keep_alive = self._keep_alive(request)
                try:
                    response = await self._handler(request)
                except Exception:
                    logger.exception("HTTP handler failed for %s %s", request.method, request.path)
                    response = json_error(500, "internal error in the controller (a bug)")
                keep_alive = await self._write(writer, response, request.version, keep_alive,
                                               head=request.method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close and drain what the client still sends, so that closing does not reset the
        connection before the client has read the error answer."""
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            deadline = asyncio.get_running_loop().time() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_BYTES:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                piece = await asyncio.wait_for(reader.read(65536), remaining)
                if not piece:
                    break
                drained += len(piece)

    @staticmethod
    def _keep_alive(request: Request) -> bool:
        conn = request.headers.get("connection", "").lower()
        if request.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT)
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, f"request headers over {self._max_header} bytes") from None
        except asyncio.IncompleteReadError as err:
            if err.partial.strip():
                raise _BadRequest(400, "connection closed in the middle of the request headers") from None
            return None
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # latin-1 decodes every byte; kept for clarity of intent
            raise _BadRequest(400, "undecodable request headers") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, f"malformed request line {lines[0][:200]!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, f"malformed header line {line[:200]!r}")
            headers[name.lower()] = value.strip()
            if len(headers) > _MAX_HEADERS:
                raise _BadRequest(431, f"more than {_MAX_HEADERS} headers")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(411, "chunked request bodies are not supported; send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _BadRequest(400, f"invalid Content-Length {length_text!r}")
        length = int(length_text)
        if length > self._max_body:
            raise _BadRequest(413, f"request body of {length} bytes is over the limit of {self._max_body}")
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await asyncio.wait_for(reader.readexactly(length), _BODY_TIMEOUT) if length else b""
        split = urlsplit(target)
        return Request(method=method.upper(), path=unquote(split.path), query=parse_qs(split.query, keep_blank_values=True),
                       version=version, headers=headers, body=body)

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response, version: str, keep_alive: bool,
                     head: bool = False) -> bool:
        reason = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else "Unknown"
        lines = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}"]
        lines += [f"{k}: {v}" for k, v in response.headers.items()]
        streaming = response.stream is not None and version != "HTTP/1.0"
        if response.stream is not None and not streaming:
            keep_alive = False  # HTTP/1.0 has no chunked encoding: the body ends with the connection
        if streaming:
            lines.append("Transfer-Encoding: chunked")
        elif response.stream is None:
            lines.append(f"Content-Length: {len(response.body)}")
        lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if head:
            if response.stream is not None:
                aclose = getattr(response.stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            await writer.drain()
            return keep_alive
        if response.stream is None:
            writer.write(response.body)
            await writer.drain()
            return keep_alive
        stream = response.stream
        try:
            async for piece in stream:
                if not piece:
                    continue
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if streaming else piece)
                await writer.drain()
            if streaming:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return keep_alive
