"""HTTP/1.1 demo backends (used by `make demo` and the tests): one process, one port per version.

Every request on a version port gets 200, body = version, header ``x-version: <version>``,
unless the port's behaviour says otherwise (error_rate -> 500, client_error_rate -> 404,
latency_ms -> added delay). Each 200 completes ``orders_per_request`` orders on average (a shop's
conversion, counted exactly: 0.25 is one order every fourth 200, no dice).

``GET /metrics`` on a version port is that version's Prometheus exposition (not counted as a
request), every series labelled ``version="<version>"`` as a real deployment's relabelling would:
  orders_completed_total{version}        orders the version completed (a business metric)
  shop_requests_total{version, code}     requests it answered, by status code

Control port (loopback):
  GET  /ready                                         -> 200 "ok"
  GET  /behaviour                                     -> JSON {port: {error_rate, client_error_rate, ...}}
  POST /behaviour?port=P&error_rate=0.3&latency_ms=800  (any of error_rate, client_error_rate,
                                                         latency_ms, orders_per_request; left out: kept)
  GET  /counts                                        -> JSON {port: requests served}

Usage: python deploy/demo/backend.py --ports-file FILE VERSION[=PORT] ...   (PORT 0 or missing: kernel picks)
The ports file ({"control": p, "versions": {version: port}}) is written once every port listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MAX_HEADER_BYTES = 64 * 1024
EXPOSITION = {"content-type": "text/plain; version=0.0.4"}  # Prometheus' text format


@dataclass
class Behaviour:
    error_rate: float = 0.0  # share answered 500
    client_error_rate: float = 0.0  # share answered 404 (a canary that lost a route, say)
    latency_ms: float = 0.0
    orders_per_request: float = 0.25  # orders completed per 200 answer


RATES = ("error_rate", "client_error_rate")  # shares in [0, 1]


@dataclass
class VersionMetrics:
    """What ``GET /metrics`` of a version port exports: counters since the process started."""

    version: str
    orders: int = 0
    order_credit: float = 0.0  # fractional orders carried to the next 200 (exact conversion, no dice)
    by_code: dict[int, int] = field(default_factory=dict)

    def answered(self, code: int, orders_per_request: float) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1
        if code == 200:
            self.order_credit += orders_per_request
            whole = int(self.order_credit)
            self.orders += whole
            self.order_credit -= whole

    def exposition(self) -> bytes:
        version = self.version.replace("\\", "\\\\").replace('"', '\\"')
        lines = [
            "# HELP orders_completed_total Orders completed by this version.",
            "# TYPE orders_completed_total counter",
            f'orders_completed_total{{version="{version}"}} {self.orders}',
            "# HELP shop_requests_total Requests this version answered, by status code.",
            "# TYPE shop_requests_total counter",
            *(f'shop_requests_total{{version="{version}",code="{code}"}} {n}'
              for code, n in sorted(self.by_code.items())),
        ]
        return ("\n".join(lines) + "\n").encode()


class Request:
    def __init__(self, method: str, target: str, version: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the stream, or None at EOF / on a malformed request."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    length = int(headers.get("content-length", "0") or "0")
    if length:
        try:
            body = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
    return Request(parts[0], parts[1], parts[2], headers, body)


def response(status: int, body: bytes, keep_alive: bool, extra: dict[str, str] | None = None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}.get(status, "X")
    headers = {
        "content-type": "text/plain",
        "content-length": str(len(body)),
        "connection": "keep-alive" if keep_alive else "close",
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


Handler = Callable[[Request], Awaitable[bytes]]


class Backends:
    def __init__(self) -> None:
        self.behaviour: dict[int, Behaviour] = {}
        self.counts: dict[int, int] = {}
        self.metrics: dict[int, VersionMetrics] = {}
        self.handlers: dict[int, Handler] = {}  # local port -> handler, filled in once bound

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = self.handlers[int(writer.get_extra_info("sockname")[1])]
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    break
                writer.write(await handler(req))
                await writer.drain()
                if not req.keep_alive:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def version_handler(self, port: int, version: str) -> Handler:
        body = version.encode()
        metrics = self.metrics[port] = VersionMetrics(version)
        headers = {"x-version": version}

        async def handle(req: Request) -> bytes:
            if req.method == "GET" and req.target == "/metrics":  # Prometheus, not a user
                return response(200, metrics.exposition(), req.keep_alive, EXPOSITION)
            self.counts[port] = self.counts.get(port, 0) + 1
            b = self.behaviour[port]
            if b.latency_ms > 0:
                await asyncio.sleep(b.latency_ms / 1000.0)
            draw = random.random()
            if draw < b.error_rate:
                status, answer = 500, f"error from {version}".encode()
            elif draw < b.error_rate + b.client_error_rate:
                status, answer = 404, f"not found on {version}".encode()
            else:
                status, answer = 200, body
            metrics.answered(status, b.orders_per_request)
            return response(status, answer, req.keep_alive, headers)

        return handle

    async def control(self, req: Request) -> bytes:
        url = urlsplit(req.target)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/ready":
            return response(200, b"ok", req.keep_alive)
        if url.path == "/counts":
            return response(200, json.dumps(self.counts).encode(), req.keep_alive)
        if url.path == "/behaviour" and req.method == "GET":
            out = {p: asdict(b) for p, b in self.behaviour.items()}
            return response(200, json.dumps(out).encode(), req.keep_alive)
        if url.path == "/behaviour" and req.method == "POST":
            try:
                port = int(q.pop("port"))
                changed = {key: float(value) for key, value in q.items()}
                new = Behaviour(**{**asdict(self.behaviour[port]), **changed})
            except (KeyError, ValueError, TypeError) as exc:
                return response(400, f"bad request: {exc!r}".encode(), req.keep_alive)
            if any(not 0.0 <= getattr(new, r) <= 1.0 for r in RATES) or new.error_rate + new.client_error_rate > 1.0:
                return response(400, b"error rates must be in [0,1] and add up to 1 at most", req.keep_alive)
            if not (new.latency_ms >= 0 and new.orders_per_request >= 0):  # NaN too
                return response(400, b"latency_ms and orders_per_request must be >= 0", req.keep_alive)
            self.behaviour[port] = new
            return response(200, json.dumps(asdict(new)).encode(), req.keep_alive)
        return response(404, b"not found", req.keep_alive)


async def main(ports_file: Path, specs: list[str], host: str = "127.0.0.1") -> None:
    backends = Backends()
    servers: list[asyncio.Server] = []
    ports: dict[str, int] = {}

    async def listen(port: int) -> int:
        server = await asyncio.start_server(
            backends.serve_connection, host, port, limit=MAX_HEADER_BYTES, backlog=1024
        )
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    for spec in specs:
        version, _, port_s = spec.partition("=")
        port = await listen(int(port_s or 0))
        backends.behaviour[port] = Behaviour()
        backends.handlers[port] = backends.version_handler(port, version)
        ports[version] = port
    control = await listen(0)
    backends.handlers[control] = backends.control

    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"control": control, "versions": ports, "pid": os.getpid()}))
    tmp.rename(ports_file)
    print(f"backend_server ready: control={control} versions={ports}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()
    print("backend_server stopping", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports-file", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 in a container)")
    ap.add_argument("versions", nargs="+", help="VERSION or VERSION=PORT")
    a = ap.parse_args()
    asyncio.run(main(a.ports_file, a.versions, a.host))
