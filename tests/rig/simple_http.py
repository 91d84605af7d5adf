"""Tiny blocking HTTP/1.1 helpers for talking to admin/control endpoints on loopback."""

from __future__ import annotations

import http.client
from dataclasses import dataclass


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: str
    headers: dict[str, str]


def http_request(
    port: int,
    path: str,
    method: str = "GET",
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> HttpResponse:
    """One request on a fresh connection; any HTTP status is returned, not raised."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read().decode("utf-8", errors="replace")
        return HttpResponse(resp.status, data, {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()
