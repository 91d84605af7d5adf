"""gRPC test backends: one process, one port per version (run with sys.executable).

Each port answers the unary method /aviary.test.Echo/Version with its version string as raw
bytes (generic handler, identity (de)serializers: no .proto needed), and /aviary.test.Echo/Count
with how many Version calls that port has served (decimal text): what tells whether a port got
calls no client made itself (mirrored copies).

Usage: grpc_backend_server.py --ports-file FILE VERSION ...
The ports file ({"versions": {version: port}}) is written once every port listens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import grpc

SERVICE = "aviary.test.Echo"
METHOD = "Version"
COUNT_METHOD = "Count"


def make_server(version: str) -> tuple[grpc.Server, int]:
    answer = version.encode()
    served = [0]
    lock = threading.Lock()

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            served[0] += 1
        return answer

    def count(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            return str(served[0]).encode()

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    methods = {METHOD: grpc.unary_unary_rpc_method_handler(handle),
               COUNT_METHOD: grpc.unary_unary_rpc_method_handler(count)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports-file", type=Path, required=True)
    ap.add_argument("versions", nargs="+")
    args = ap.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    servers: list[grpc.Server] = []
    ports: dict[str, int] = {}
    for version in args.versions:
        server, port = make_server(version)
        servers.append(server)
        ports[version] = port
    tmp = args.ports_file.with_name(args.ports_file.name + ".tmp")
    tmp.write_text(json.dumps({"versions": ports, "pid": os.getpid()}))
    os.replace(tmp, args.ports_file)
    print(f"grpc_backend_server ready: {ports}", flush=True)

    while not stop.wait(1.0):
        pass
    for event in [s.stop(grace=0.5) for s in servers]:
        event.wait(2.0)
    print("grpc_backend_server stopped", flush=True)


if __name__ == "__main__":
    main()
