"""TLS credentials from PEM files, for the xDS and admin servers and the admin client.

Files are read once, when the credentials are built; a missing or unreadable file raises
``TlsConfigError`` naming the option it came from, so a bad path fails at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["ClientTls", "ServerTls", "TlsConfigError", "client_credentials", "server_credentials"]


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's certificate chain and key; with ``client_ca``, clients must present a certificate
    signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class ClientTls:
    """``ca`` verifies the server (None: the system roots); ``cert`` and ``key`` are the client's
    own certificate for mutual TLS, given together or not at all."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a client certificate needs its key and a key needs its certificate")


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path}: not a PEM file")
    return data


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    pair = (_read(tls.key, "TLS key"), _read(tls.cert, "TLS certificate"))
    if tls.client_ca is None:
        return grpc.ssl_server_credentials([pair])
    ca = _read(tls.client_ca, "TLS client CA")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


def client_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    ca = _read(tls.ca, "TLS CA") if tls.ca is not None else None
    key = _read(tls.key, "TLS key") if tls.key is not None else None
    cert = _read(tls.cert, "TLS certificate") if tls.cert is not None else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
