"""The admin gRPC server: the Admin service, gRPC health checking and reflection, on one port.

Start-up refuses configurations that would expose rollout control: serving on an address that is
not loopback without a token file is an ``AdminConfigError`` saying why, raised before anything
listens. With a token, calls need ``authorization: Bearer <token>`` (``aviary.admin.auth``),
except health checks. With TLS (``ServerTls``), a client CA makes client certificates mandatory.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aviary.admin.auth import AuthConfigError, TokenAuth, read_token
from aviary.admin.service import SERVICE_NAME, AdminService
from aviary.listen import ListenError, check_can_listen, grpc_options
from aviary.tls import ServerTls, TlsConfigError, server_credentials

__all__ = [
    "DEFAULT_ADMIN_ADDRESS",
    "AdminConfig",
    "AdminConfigError",
    "AdminServer",
    "is_loopback",
    "load_admin_token",
    "start_admin_server",
]

log = logging.getLogger("aviary.admin")

DEFAULT_ADMIN_ADDRESS = "127.0.0.1:18001"


class AdminConfigError(ValueError):
    """The admin server must not start as configured; the message says why."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    address: str = DEFAULT_ADMIN_ADDRESS
    token_file: Path | None = None
    tls: ServerTls | None = None


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.removeprefix("[").removesuffix("]")


def is_loopback(address: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and ``localhost``; every other host counts as exposed."""
    host = _host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_admin_token(config: AdminConfig) -> str | None:
    """The token to require, after the checks that may refuse start-up (AdminConfigError)."""
    if config.token_file is None:
        if not is_loopback(config.address):
            raise AdminConfigError(
                f"refusing to serve the admin API on {config.address} without --admin-token-file: "
                "anyone who can reach that address could pause, promote or abort rollouts. "
                "Give a token file, or listen on 127.0.0.1"
            )
        return None
    try:
        token = read_token(config.token_file)
    except AuthConfigError as exc:
        raise AdminConfigError(str(exc)) from exc
    if config.tls is None and not is_loopback(config.address):
        log.warning("admin API on %s without TLS: the token crosses the network in clear text", config.address)
    return token


@dataclass(slots=True)
class AdminServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service: AdminService

    async def set_serving(self, serving: bool) -> None:
        """Report whether the control plane can make progress (the server and the Admin service):
        NOT_SERVING while the engine cannot (see ``ControlPlane.health``)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        self.service.close()
        await self.server.stop(grace)
        await self.service.stop_workers()  # once no call can start another validation


async def start_admin_server(config: AdminConfig, service: AdminService) -> AdminServer:
    """Listen on ``config.address`` (port 0 picks one; see ``AdminServer.port``)."""
    token = load_admin_token(config)
    try:
        credentials = server_credentials(config.tls) if config.tls is not None else None
    except TlsConfigError as exc:
        raise AdminConfigError(str(exc)) from exc
    # SO_REUSEPORT off: a second instance on this address must fail, not share the admin calls.
    server = grpc.aio.server(
        interceptors=[TokenAuth(token)] if token is not None else None, options=grpc_options(reuse_port=False)
    )
    service.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind"; the OS error went to its log only
        port = 0
    if port == 0:
        check_can_listen("admin", config.address)  # raises with the OS error if it can name one
        raise ListenError("admin", config.address, "cannot listen")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    tls = "mTLS" if config.tls and config.tls.client_ca else "TLS" if config.tls else "plaintext"
    auth = "bearer token" if token is not None else "no token (loopback only)"
    log.info("admin API listening on %s:%d (%s, %s)", _host(config.address), port, tls, auth)
    return AdminServer(server, port, health_servicer, service)
