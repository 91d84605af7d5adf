"""Listening sockets that refuse a busy port, for the xDS, admin and metrics servers.

grpcio sets SO_REUSEPORT on its listening sockets by default: a second ``aviary serve`` on the
same address then starts without error and the kernel splits proxies and admin calls between the
two processes. Aviary's servers turn it off (``grpc_options``), so a busy port fails to bind;
``reuse_port=True`` exists for the deliberate case of one instance sharing its xDS port among its
own worker processes.

``check_can_listen`` binds and closes a plain socket (SO_REUSEADDR only, as grpcio and
``http.server`` use) to learn before start-up whether an address is free, with the OS error
("Address already in use", "Cannot assign requested address") that gRPC only prints to its log.

Exceptions::

    ListenError     an address cannot be listened on; ``role`` says which server ("xds",
                    "admin", "metrics"), ``address`` and ``reason`` what and why
"""

from __future__ import annotations

import errno
import socket
from typing import Literal

__all__ = ["ListenError", "Role", "check_can_listen", "grpc_options", "split_address"]

Role = Literal["xds", "admin", "metrics"]


class ListenError(Exception):
    def __init__(self, role: Role, address: str, reason: str) -> None:
        super().__init__(f"{address}: {reason}")
        self.role = role
        self.address = address
        self.reason = reason


def grpc_options(reuse_port: bool = False) -> list[tuple[str, int]]:
    """Server options for ``grpc.aio.server``: SO_REUSEPORT only when asked for."""
    return [("grpc.so_reuseport", 1 if reuse_port else 0)]


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def check_can_listen(role: Role, address: str) -> None:
    """Raise ``ListenError`` if ``address`` cannot be bound now (port 0 always can)."""
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise ListenError(role, address, str(exc)) from None
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(role, address, f"cannot resolve {host!r}: {exc.strerror}") from None
    # Like gRPC: fine if any resolved address binds ("localhost" on a host without IPv6), but a
    # busy one is always a refusal: another server would get some of the connections.
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    failures.insert(0, exc)
                else:
                    failures.append(exc)
    if failures and (failures[0].errno == errno.EADDRINUSE or len(failures) == len(infos)):
        raise ListenError(role, address, (failures[0].strerror or str(failures[0])).lower())
