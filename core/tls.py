"""TLS for gRPC: PEM files -> server and channel credentials.

One certificate/key pair per process serves both ends: the process presents it as a server and, when
it calls a peer, as a client certificate (``scripts/make_certs.sh`` gives the certificates both
``serverAuth`` and ``clientAuth``). A CA file means mutual TLS: a server with a CA requires and verifies
client certificates signed by it; a client with a CA verifies the server against it (without one, the
system roots).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A TLS file is missing or unreadable, or a certificate was given without its key (or back)."""


def read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of the PEM file ``path``; ``TlsConfigError`` naming ``what`` when it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TlsConfigError(f"cannot read the TLS {what} file {str(path)!r}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"the TLS {what} file {str(path)!r} is not PEM (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The certificate, key and CA files of one process (any may be None: TLS off)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            given, missing = ("certificate", "key") if self.cert else ("key", "certificate")
            raise TlsConfigError(f"a TLS {given} file was given without its {missing} file: give both "
                                 "(--tls-cert and --tls-key, or tls_cert_file and tls_key_file)")
        for path, what in ((self.cert, "certificate"), (self.key, "key"), (self.ca, "CA")):
            if path:
                read_pem(path, what)  # fail at start, not at the first connection

    @property
    def server_enabled(self) -> bool:
        """True when this process serves TLS (it has a certificate and key)."""
        return bool(self.cert)

    @property
    def client_enabled(self) -> bool:
        """True when this process calls its peers over TLS (it has a CA or a client certificate)."""
        return bool(self.ca or self.cert)

    @property
    def mutual(self) -> bool:
        """True when a server of this process requires client certificates (a CA is given)."""
        return bool(self.ca and self.cert)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for ``add_secure_port``, or None when TLS is off (serve plaintext)."""
        if not self.server_enabled:
            return None
        assert self.cert and self.key
        ca = read_pem(self.ca, "CA") if self.ca else None
        return grpc.ssl_server_credentials([(read_pem(self.key, "key"), read_pem(self.cert, "certificate"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for a secure channel (server checked against the CA, our certificate shown
        for mTLS), or None when TLS is off (plaintext channel)."""
        if not self.client_enabled:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "CA") if self.ca else None,
            private_key=read_pem(self.key, "key") if self.key else None,
            certificate_chain=read_pem(self.cert, "certificate") if self.cert else None)
