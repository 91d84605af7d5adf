"""A stand-in for ``aviary.discovery.worker_main`` that speaks the engine protocol and can hang.

``python -m tests.rig.fake_xds_worker [--hang W] [--pongs K]`` followed by the arguments the engine
passes (``--fd N --worker W ...``). It takes the first sync, says ready (it listens on nothing), and
reports one connected proxy ``node-W`` so the engine has a stream to take back. Then it answers every
ping, except worker number ``--hang``: after ``--pongs`` answers it blocks, as an event loop stuck in
a blocking call would, still alive and still holding its socket.

Plain blocking I/O on purpose: it tests the supervisor (``aviary.discovery.workers``), not a worker.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import BinaryIO

from aviary.discovery.proxy_events import ProxyConnected
from aviary.discovery.worker_protocol import (
    HEADER,
    Ping,
    Stop,
    decode_from_engine,
    encode_events,
    first_stream_id,
    pong_message,
    ready_message,
)

HANG_SECONDS = 3600.0  # "forever": the engine kills it long before


def read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return stream.read(size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-xds-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--hang", type=int, default=0, help="the worker number that hangs (0: none)")
    parser.add_argument("--pongs", type=int, default=2, help="pings the hanging worker answers first")
    args, _ = parser.parse_known_args(argv)  # --address, --log-level ...: not used
    sock = socket.socket(fileno=args.fd)
    stream = sock.makefile("rb")
    if read_frame(stream) is None:  # the first sync
        return 0
    sock.sendall(ready_message(0))
    connected = ProxyConnected(first_stream_id(args.worker), f"node-{args.worker}", "", "fake", time.time())
    sock.sendall(encode_events([connected]))
    answered = 0
    while (payload := read_frame(stream)) is not None:
        message = decode_from_engine(payload)
        if isinstance(message, Stop):
            return 0
        if isinstance(message, Ping):
            if args.worker == args.hang and answered >= args.pongs:
                time.sleep(HANG_SECONDS)
            sock.sendall(pong_message())
            answered += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
