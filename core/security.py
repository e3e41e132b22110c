"""One process's security settings: the shared bearer token and its TLS files.

Every process builds one ``SecuritySettings`` at start, from its flags (``add_arguments`` /
``from_args``), from the agent's yaml (``from_mapping`` on ``extra_config``) or from the environment
alone (``load``), and hands it to ``kvmesh.core.grpc_server`` and ``kvmesh.core.channels``. Sources,
first found wins: the explicit value (flag or yaml key), then the environment:

| what | flag | yaml (``extra_config``) | environment |
| --- | --- | --- | --- |
| token file | ``--auth-token-file`` | ``auth_token_file`` | ``KVMESH_AUTH_TOKEN_FILE`` |
| certificate | ``--tls-cert`` | ``tls_cert_file`` | ``KVMESH_TLS_CERT_FILE`` |
| key | ``--tls-key`` | ``tls_key_file`` | ``KVMESH_TLS_KEY_FILE`` |
| CA (mTLS) | ``--tls-ca`` | ``tls_ca_file`` | ``KVMESH_TLS_CA_FILE`` |
| bind beyond loopback with no token | ``--insecure`` | ``insecure`` | ``KVMESH_INSECURE=1`` |

The token itself never appears in a repr, a log line or an error message.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from .auth import ENV_TOKEN_FILE, METADATA_KEY, bearer_value, check_bind_allowed, load_token
from .tls import TlsFiles

ENV_TLS_CERT = "KVMESH_TLS_CERT_FILE"
ENV_TLS_KEY = "KVMESH_TLS_KEY_FILE"
ENV_TLS_CA = "KVMESH_TLS_CA_FILE"
ENV_INSECURE = "KVMESH_INSECURE"

# extra_config keys of the agent's yaml.
YAML_KEYS = ("auth_token_file", "tls_cert_file", "tls_key_file", "tls_ca_file", "insecure")

_TRUE = frozenset({"1", "true", "yes", "on"})


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


@dataclass(frozen=True)
class SecuritySettings:
    """The token (None: no auth, loopback only) and TLS files of one process."""

    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    insecure: bool = False
    # Where the token came from (for messages; never the token itself).
    token_file: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tls", TlsFiles(self.tls_cert, self.tls_key, self.tls_ca))

    # Building
    @classmethod
    def load(cls, *, token_file: str | os.PathLike[str] | None = None, tls_cert: str | None = None,
             tls_key: str | None = None, tls_ca: str | None = None, insecure: bool = False,
             env: Mapping[str, str] | None = None) -> SecuritySettings:
        """Explicit values first, the environment for what is not given. ``ValueError`` (a
        ``TokenFileError`` or ``TlsConfigError``) says what is wrong with a file."""
        env = os.environ if env is None else env
        token_path = str(token_file) if token_file else (env.get(ENV_TOKEN_FILE, "").strip() or None)
        return cls(token=load_token(token_path) if token_path else None,
                   tls_cert=tls_cert or env.get(ENV_TLS_CERT, "").strip() or None,
                   tls_key=tls_key or env.get(ENV_TLS_KEY, "").strip() or None,
                   tls_ca=tls_ca or env.get(ENV_TLS_CA, "").strip() or None,
                   insecure=bool(insecure) or _truthy(env.get(ENV_INSECURE, "")),
                   token_file=token_path)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> SecuritySettings:
        """From the agent's ``extra_config`` keys (``auth_token_file``, ``tls_cert_file``, ...)."""
        def path(key: str) -> str | None:
            value = values.get(key)
            return os.path.expanduser(str(value)) if value not in (None, "") else None

        return cls.load(token_file=path("auth_token_file"), tls_cert=path("tls_cert_file"),
                        tls_key=path("tls_key_file"), tls_ca=path("tls_ca_file"),
                        insecure=_truthy(values.get("insecure", False)), env=env)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, server: bool = True) -> None:
        """The security flags; ``server=False`` (a client such as the CLI) leaves out ``--insecure``."""
        g = parser.add_argument_group("security")
        g.add_argument("--auth-token-file", default=None,
                       help=f"file holding the shared bearer token (default: ${ENV_TOKEN_FILE})")
        g.add_argument("--tls-cert", default=None,
                       help=f"PEM certificate: serve TLS and show it to peers (default: ${ENV_TLS_CERT})")
        g.add_argument("--tls-key", default=None, help=f"PEM private key of --tls-cert (default: ${ENV_TLS_KEY})")
        g.add_argument("--tls-ca", default=None,
                       help=f"PEM CA: verify peers against it; servers then require client certificates "
                            f"(mutual TLS) (default: ${ENV_TLS_CA})")
        if server:
            g.add_argument("--insecure", action="store_true",
                           help="allow listening beyond loopback with no token (not for production)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> SecuritySettings:
        """From the flags of ``add_arguments`` (the environment fills what was not given)."""
        return cls.load(token_file=args.auth_token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_ca=args.tls_ca, insecure=getattr(args, "insecure", False), env=env)

    # Using
    @property
    def tls(self) -> TlsFiles:
        return self._tls  # type: ignore[attr-defined,no-any-return]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """For ``add_secure_port``; None: serve plaintext."""
        return self.tls.server_credentials()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For ``secure_channel``; None: plaintext channel."""
        return self.tls.channel_credentials()

    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: ``authorization: Bearer <token>`` (empty with no token)."""
        return ((METADATA_KEY, bearer_value(self.token)),) if self.token else ()

    def http_headers(self) -> dict[str, str]:
        """The headers every HTTP call carries (empty with no token)."""
        return {"Authorization": bearer_value(self.token)} if self.token else {}

    def check_bind(self, host: str, what: str) -> None:
        """``BindRefused`` when ``host`` is beyond loopback, there is no token, and not ``insecure``."""
        check_bind_allowed(host, self.token, insecure=self.insecure, what=what)


NO_SECURITY = SecuritySettings()
