"""`aviary serve` options for the admin API and TLS, turned into ServeConfig fields."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from aviary.admin.server import DEFAULT_ADMIN_ADDRESS, AdminConfig
from aviary.tls import ServerTls, TlsConfigError

__all__ = ["add_serve_options", "serve_settings"]


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    admin = serve.add_argument_group("admin API")
    admin.add_argument("--admin-address", default=DEFAULT_ADMIN_ADDRESS, metavar="HOST:PORT",
                       help=f"admin gRPC API (default {DEFAULT_ADMIN_ADDRESS}; '' to disable); an address that is "
                            "not loopback needs --admin-token-file")
    admin.add_argument("--admin-token-file", metavar="FILE",
                       help="require 'authorization: Bearer <token>' with the token in FILE (health checks stay open)")
    admin.add_argument("--admin-tls-cert", metavar="FILE", help="serve the admin API over TLS with this certificate")
    admin.add_argument("--admin-tls-key", metavar="FILE", help="key of --admin-tls-cert")
    admin.add_argument("--admin-tls-client-ca", metavar="FILE", help="require client certificates signed by this CA")
    xds = serve.add_argument_group("xDS TLS")
    xds.add_argument("--xds-tls-cert", metavar="FILE", help="serve xDS over TLS with this certificate")
    xds.add_argument("--xds-tls-key", metavar="FILE", help="key of --xds-tls-cert")
    xds.add_argument("--xds-tls-client-ca", metavar="FILE", help="require proxy certificates signed by this CA")


def _server_tls(cert: str | None, key: str | None, client_ca: str | None, prefix: str) -> ServerTls | None:
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise TlsConfigError(f"--{prefix}-tls-cert and --{prefix}-tls-key must be given together")
    return ServerTls(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServeConfig keyword arguments ``admin`` and ``xds_tls``; TlsConfigError for half a TLS setup."""
    admin = None
    if args.admin_address:
        admin = AdminConfig(
            address=args.admin_address,
            token_file=Path(args.admin_token_file) if args.admin_token_file else None,
            tls=_server_tls(args.admin_tls_cert, args.admin_tls_key, args.admin_tls_client_ca, "admin"),
        )
    xds_tls = _server_tls(args.xds_tls_cert, args.xds_tls_key, args.xds_tls_client_ca, "xds")
    return {"admin": admin, "xds_tls": xds_tls}
