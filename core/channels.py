"""The one factory of gRPC client channels (sync and asyncio) of every kvmesh process.

A channel gets the shared options (message limits, fast reconnect), TLS credentials when the settings
have a CA or a certificate, and an interceptor that adds ``authorization: Bearer <token>`` and the
current ``x-request-id`` to every call. It is an interceptor, not call credentials, on purpose: gRPC
sends call credentials only over TLS, and loopback meshes run plaintext with a token.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import grpc

from . import requestid
from .security import NO_SECURITY, SecuritySettings

MiB = 1 << 20
# Big enough for a chunk of a large model's KV (hundreds of MiB); every process uses the same.
MAX_MESSAGE_BYTES = 1 << 30
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Fail fast on a dead peer instead of waiting for the reconnect backoff to give up.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

Options = Sequence[tuple[str, Any]]


def channel_options(extra: Options = ()) -> list[tuple[str, Any]]:
    """The shared options with ``extra`` overriding same-named ones."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update(dict(extra))
    return list(merged.items())


def _with_metadata(metadata: Any, extra: tuple[tuple[str, str], ...]) -> list[tuple[str, Any]]:
    """The call's metadata plus ``extra`` (keys the caller already set are left as they are)."""
    existing = [tuple(m) for m in (metadata or ())]
    present = {k for k, _ in existing}
    return [*existing, *((k, v) for k, v in extra if k not in present)]


def _extra_metadata(security: SecuritySettings) -> tuple[tuple[str, str], ...]:
    return (*security.grpc_metadata(), *requestid.outgoing_metadata())


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _SyncAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, security: SecuritySettings) -> None:
        self._security = security

    def _details(self, d: grpc.ClientCallDetails) -> _SyncDetails:
        return _SyncDetails(d.method, d.timeout, _with_metadata(d.metadata, _extra_metadata(self._security)),
                            d.credentials, getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _AioAuthBase:
    def __init__(self, security: SecuritySettings) -> None:
        self._security = security

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*_with_metadata(d.metadata, _extra_metadata(self._security)))
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# grpc.aio files an interceptor under the FIRST kind it is an instance of (an if/elif chain in
# grpc.aio.Channel), so one object implementing all four would only ever see unary-unary calls and
# every streamed call (Compress, Move, WatchEvent, ...) would go out without the token: one class per kind.
class _AioUnaryUnaryAuth(_AioAuthBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStreamAuth(_AioAuthBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnaryAuth(_AioAuthBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _AioStreamStreamAuth(_AioAuthBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def _aio_interceptors(security: SecuritySettings) -> list[Any]:
    return [cls(security) for cls in (_AioUnaryUnaryAuth, _AioUnaryStreamAuth, _AioStreamUnaryAuth,
                                      _AioStreamStreamAuth)]


def channel(target: str, security: SecuritySettings = NO_SECURITY, *, options: Options = ()) -> grpc.Channel:
    """A blocking channel to ``target`` (``host:port``): TLS when configured, token on every call."""
    opts = channel_options(options)
    creds = security.channel_credentials()
    raw = grpc.secure_channel(target, creds, options=opts) if creds is not None else \
        grpc.insecure_channel(target, options=opts)
    return grpc.intercept_channel(raw, _SyncAuth(security))


def aio_channel(target: str, security: SecuritySettings = NO_SECURITY, *,
                options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (``host:port``): TLS when configured, token on every call.

    Create it on the loop that will use it."""
    opts = channel_options(options)
    creds = security.channel_credentials()
    interceptors = _aio_interceptors(security)
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
