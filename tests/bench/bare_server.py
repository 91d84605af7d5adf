"""The baseline of the fan-out benchmark: an ADS server that does nothing but write bytes.

    python -m tests.bench.bare_server PORT --rollouts 100 --changes 20    (from the repository root)

It serves the same resources Aviary would (built once, at start, with Aviary's own builders) as
pre-serialized DiscoveryResponses: no snapshot, no versioning, no ACK bookkeeping. Whatever Aviary
costs above this is Aviary's; whatever this costs is grpc.aio and Python's. Several of these
processes can bind one port (grpcio sets SO_REUSEPORT by default; the kernel splits connections),
which is the baseline for Aviary's stream worker processes. It runs on the event loop Aviary runs
on (`aviary.eventloop`), so that the loop is not what tells them apart.

Prints ``listening`` once bound. On stdin, ``push K`` writes route version K (0..changes) to every
stream subscribed to RDS; ``quit`` or end of input stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from aviary import eventloop
from aviary.discovery.resources import PublishedRollout, build_snapshot
from aviary.discovery.server import ADS_SERVICE
from aviary.discovery.wire import discovery_response, resources_entry
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend
from tests.bench.fanout_client import CDS, EDS, LDS, RDS, raise_fd_limit

LISTENER = ListenerSpec(address="127.0.0.1", port=10000)
V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:8081"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:8082"),))


def rollout_name(index: int) -> str:
    """The benchmark's rollout names (Aviary's policy files use the same)."""
    return f"r{index:04d}"


def responses(rollouts: int, changes: int) -> tuple[dict[str, bytes], list[bytes]]:
    """The response per type at start, and the RDS response of each change (rollout 0's canary at 10 + k %)."""

    def snapshot_of(weight: int) -> dict[str, bytes]:
        published = [
            PublishedRollout.of(rollout_name(i), LISTENER, (f"{rollout_name(i)}.example.com",),
                                ((V1, 100 - (weight if i == 0 else 10)), (V2, weight if i == 0 else 10)), (V1, V2))
            for i in range(rollouts)
        ]  # fmt: skip
        snapshot = build_snapshot(published)
        out = {}
        for type_url in (CDS, EDS, LDS, RDS):
            items = snapshot.items(type_url)
            out[type_url] = discovery_response(
                f"{type_url[-8:]}-{weight}", type_url, f"n{weight}",
                [resources_entry(items[name].any_bytes) for name in sorted(items)],
            )  # fmt: skip
        return out

    initial = snapshot_of(10)
    return initial, [snapshot_of(10 + k)[RDS] for k in range(changes + 1)]


class BareAds:
    """Per stream: answer each new subscription with the current bytes, ignore ACKs, forward pushes."""

    def __init__(self, initial: dict[str, bytes]) -> None:
        self.current = dict(initial)
        self.route_inboxes: set[asyncio.Queue[bytes | None]] = set()

    def push(self, route_response: bytes) -> None:
        self.current[RDS] = route_response
        for inbox in self.route_inboxes:
            inbox.put_nowait(route_response)

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext[object, bytes]
    ) -> None:
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        subscribed: dict[str, list[str]] = {}

        async def read() -> None:
            try:
                async for request in requests:
                    names = list(request.resource_names)
                    if subscribed.get(request.type_url) != names:  # a (re)subscription, not an ACK
                        subscribed[request.type_url] = names
                        if request.type_url == RDS:
                            self.route_inboxes.add(inbox)
                        inbox.put_nowait(self.current[request.type_url])
            finally:
                inbox.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (data := await inbox.get()) is not None:
                await context.write(data)
        finally:
            self.route_inboxes.discard(inbox)
            reader.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    raise_fd_limit()
    initial, pushes = responses(args.rollouts, args.changes)
    service = BareAds(initial)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1),
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ])  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.stream, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=lambda data: data,
        ),
    }),))  # fmt: skip
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("listening", flush=True)
    try:
        while line := (await stdin.readline()).decode().strip():
            if line.startswith("push "):
                service.push(pushes[int(line.split()[1])])
            elif line == "quit":
                break
    finally:
        await server.stop(0)


if __name__ == "__main__":
    eventloop.run(main())  # the event loop aviary serve runs on (uvloop; AVIARY_UVLOOP=0: asyncio's)
