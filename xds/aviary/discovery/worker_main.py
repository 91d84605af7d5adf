"""One xDS stream worker process: ``python -m aviary.discovery.worker_main --fd N --worker W --address A``.

Started by ``aviary.discovery.workers`` (see ``worker_protocol`` for the messages). It

1. reads the first ``sync`` from the socket ``--fd`` and puts it in its own `SnapshotCache`, so the
   first proxy it accepts gets the current configuration, never an older one;
2. listens on ``--address`` (a concrete port) with SO_REUSEPORT, beside the other workers of the
   same ``aviary serve``, and says ``ready``;
3. serves ADS and the per-type services with the same `AggregatedDiscoveryService` and streams as
   the single process, numbering streams from ``first_stream_id(W)``, answering a new stream only after a barrier
   round trip with the engine (so it holds every snapshot published before the stream started),
   and sends every proxy event back, batched per turn of the event loop; answers the engine's pings
   from the same loop (one that stops answering is killed and replaced);
4. serves the Envoy report services (``aviary.reports.ingest``) on the same address and sends
   what arrives to the engine, batched per turn of the loop (``aviary.reports.forward``);
5. on ``stop``, on SIGTERM, or when the socket closes (the engine process is gone, even killed),
   ends its streams with status OK and exits: it never outlives the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import sys
from pathlib import Path

from aviary import eventloop, logs
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.proxy_events import ProxyEvent
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.discovery.worker_protocol import (
    HEADER,
    MAX_FRAME,
    Barrier,
    Ping,
    ProtocolError,
    SnapshotMirror,
    Stop,
    Sync,
    barrier_message,
    decode_from_engine,
    encode_events,
    first_stream_id,
    pong_message,
    ready_message,
    reports_message,
)
from aviary.reports.forward import Batch, ReportForwarder
from aviary.reports.ingest import report_handlers
from aviary.tls import ServerTls, server_credentials

log = logging.getLogger("aviary.xds")

STOP_GRACE_SECONDS = 1.0


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, None at end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes")
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


class _EventSender:
    """Events emitted during one turn of the loop go out as one frame."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[ProxyEvent] = []

    def emit(self, event: ProxyEvent) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(event)

    def _flush(self) -> None:
        events, self._pending = self._pending, []
        if events and not self._writer.is_closing():
            self._writer.write(encode_events(events))


class _Barriers:
    """Barriers asked of the engine; callers waiting in one turn of the loop share one."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._numbers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._unsent: tuple[int, asyncio.Future[None]] | None = None

    async def wait(self) -> None:
        if self._unsent is None:
            number = next(self._numbers)
            future = asyncio.get_running_loop().create_future()
            self._unsent = (number, future)
            self._waiting[number] = future
            asyncio.get_running_loop().call_soon(self._send)
        await asyncio.shield(self._unsent[1])

    def _send(self) -> None:
        if self._unsent is not None:
            number, self._unsent = self._unsent[0], None
            self._writer.write(barrier_message(number))

    def passed(self, number: int) -> None:
        for waiting in [n for n in self._waiting if n <= number]:
            future = self._waiting.pop(waiting)
            if not future.done():
                future.set_result(None)


async def run(fd: int, worker: int, address: str, tls: ServerTls | None) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    cache = SnapshotCache()
    mirror = SnapshotMirror()
    first = await read_frame(reader)
    if first is None:
        return 0  # the engine went away before sending anything
    message = decode_from_engine(first)
    if not isinstance(message, Sync):
        return 0
    cache.publish(mirror.apply(message))
    sender = _EventSender(writer)
    barriers = _Barriers(writer)
    ads = AggregatedDiscoveryService(cache, sender.emit, first_stream_id(worker), admit=barriers.wait)
    credentials = server_credentials(tls) if tls is not None else None

    def forward(batch: Batch) -> None:
        if not writer.is_closing():
            writer.write(reports_message(batch))

    server, port = await start_xds_server(address, ads, credentials, reuse_port=True,
                                          extra_handlers=report_handlers(ReportForwarder(forward)))
    writer.write(ready_message(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reading = asyncio.create_task(_follow(reader, writer, cache, mirror, barriers))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done() and reading.exception() is not None:
            log.error("xDS worker %d: %s", worker, reading.exception())
    finally:
        for task in (reading, stopping):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        ads.close()  # streams end with status OK; the proxies reconnect to another worker
        await server.stop(STOP_GRACE_SECONDS)
        with contextlib.suppress(Exception):
            writer.close()
    return 0


async def _follow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cache: SnapshotCache,
                  mirror: SnapshotMirror, barriers: _Barriers) -> None:
    """Apply the engine's syncs, in order, and answer its pings, until it says stop or goes away."""
    while True:
        payload = await read_frame(reader)
        if payload is None:
            return
        message = decode_from_engine(payload)
        if isinstance(message, Stop):
            return
        if isinstance(message, Barrier):
            barriers.passed(message.number)
        elif isinstance(message, Ping):  # from this loop: a loop that is stuck does not answer
            writer.write(pong_message())
        else:
            cache.publish(mirror.apply(message))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aviary-xds-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path)
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process decides when workers stop
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert and args.tls_key else None
    return eventloop.run(run(args.fd, args.worker, args.address, tls))


if __name__ == "__main__":
    sys.exit(main())
