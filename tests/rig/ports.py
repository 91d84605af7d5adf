"""Free TCP ports on 127.0.0.1 (the kernel picks them: bind to port 0)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct free ports. All sockets stay open until every port is picked,
    so the kernel cannot hand out the same port twice."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """Return one free port on 127.0.0.1."""
    return free_ports(1)[0]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
