"""The shared bearer token of both planes (HTTP and gRPC).

Every process reads the token from the file named by ``--auth-token-file`` or, when that is not
given, by ``KVMESH_AUTH_TOKEN_FILE``. HTTP callers send ``Authorization: Bearer <token>``, gRPC
callers the metadata ``authorization: Bearer <token>``. Tokens are compared in constant time and
never logged.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

ENV_TOKEN_FILE = "KVMESH_AUTH_TOKEN_FILE"
METADATA_KEY = "authorization"
MIN_TOKEN_CHARS = 16
HOW_TO_MAKE_ONE = ("make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > token "
                   "&& chmod 600 token, then pass --auth-token-file token (or set KVMESH_AUTH_TOKEN_FILE)")


class TokenFileError(ValueError):
    """The token file is missing, unreadable, empty or too short."""


def token_file_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The token file to use: the explicit one, else ``$KVMESH_AUTH_TOKEN_FILE``, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_TOKEN_FILE, "").strip()
    return Path(env) if env else None


def load_token(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The token (stripped of surrounding whitespace), or None when no token file is configured."""
    path = token_file_path(explicit)
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise TokenFileError(f"cannot read the auth token file {str(path)!r}: {err.strerror or err}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(f"the auth token in {str(path)!r} is {'empty' if not token else 'too short'} "
                             f"(at least {MIN_TOKEN_CHARS} characters); {HOW_TO_MAKE_ONE}")
    return token


def bearer_value(token: str) -> str:
    """The value of an ``Authorization`` header (or ``authorization`` metadata) carrying ``token``."""
    return f"Bearer {token}"


def bearer_ok(header_value: str | bytes | None, token: str | None) -> bool:
    """True when ``header_value`` is ``Bearer <token>``; always True when no token is configured.

    The comparison takes the same time wherever the values differ (``hmac.compare_digest``).
    """
    if token is None:
        return True
    if header_value is None:
        return False
    if isinstance(header_value, bytes):
        try:
            header_value = header_value.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            return False
    scheme, _, presented = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses (127.0.0.0/8 and ::1)."""
    h = host.strip().lower()
    return h in LOOPBACK_HOSTS or h.startswith("127.")


class BindRefused(PermissionError):
    """Listening beyond loopback without a token was asked for: an ``OSError``, so every process's
    ``main`` reports it as a failed start (exit 1) with the message saying how to make a token."""


def bind_refusal(host: str, token: str | None, *, insecure: bool = False, what: str = "this server") -> str | None:
    """Why ``host`` may not be bound (no token, not loopback, no explicit ``insecure``), or None."""
    if token is None and not insecure and not is_loopback(host):
        return (f"refusing to serve {what} on {host!r} without an auth token: with no token only "
                f"loopback is allowed. {HOW_TO_MAKE_ONE}; or pass --insecure to accept the risk.")
    return None


def check_bind_allowed(host: str, token: str | None, *, insecure: bool = False, what: str = "this server") -> None:
    """Refuse to listen beyond loopback without a token (unless ``insecure`` is set explicitly).

    Raises ``BindRefused`` (a ``PermissionError``) carrying the how-to message.
    """
    why = bind_refusal(host, token, insecure=insecure, what=what)
    if why is not None:
        raise BindRefused(why)
