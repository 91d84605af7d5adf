"""HTTP/1.1 demo backends (used by `make demo` and the tests): one process, one port per version.

Every request on a version port gets 200, body = version, header ``x-version: <version>``,
unless the port's behaviour says otherwise (error_rate -> 500, latency_ms -> added delay).

Control port (loopback):
  GET  /ready                                         -> 200 "ok"
  GET  /behaviour                                     -> JSON {port: {error_rate, latency_ms}}
  POST /behaviour?port=P&error_rate=0.3&latency_ms=800  (either parameter may be left out)
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
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MAX_HEADER_BYTES = 64 * 1024


@dataclass
class Behaviour:
    error_rate: float = 0.0
    latency_ms: float = 0.0


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

        async def handle(req: Request) -> bytes:
            self.counts[port] = self.counts.get(port, 0) + 1
            b = self.behaviour[port]
            if b.latency_ms > 0:
                await asyncio.sleep(b.latency_ms / 1000.0)
            if b.error_rate > 0 and random.random() < b.error_rate:
                return response(500, f"error from {version}".encode(), req.keep_alive, {"x-version": version})
            return response(200, body, req.keep_alive, {"x-version": version})

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
                b = self.behaviour[int(q["port"])]
                error_rate = float(q.get("error_rate", b.error_rate))
                latency_ms = float(q.get("latency_ms", b.latency_ms))
            except (KeyError, ValueError) as exc:
                return response(400, f"bad request: {exc!r}".encode(), req.keep_alive)
            if not (0.0 <= error_rate <= 1.0) or latency_ms < 0:
                return response(400, b"error_rate must be in [0,1], latency_ms >= 0", req.keep_alive)
            b.error_rate, b.latency_ms = error_rate, latency_ms
            return response(200, json.dumps(asdict(b)).encode(), req.keep_alive)
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
