"""One client process of the fan-out benchmark: N ADS streams that behave like Envoy.

    python -m tests.bench.fanout_client PORT --streams 1000 [--protocol delta]   (from the repository root)

Each stream has its own channel, so its own TCP connection, as every Envoy has: the server under
test pays per connection what it would pay in production. A stream asks like Envoy does (wildcard
CDS and LDS, then EDS and RDS by the names those carry) and ACKs every response: with
``--protocol sotw`` (the default) on ``StreamAggregatedResources``, with ``--protocol delta`` on
``DeltaAggregatedResources`` (subscribing to the EDS and RDS names as they appear, unsubscribing
the EDS names of removed clusters, ACKing with the nonce). Responses are counted in bytes as they
arrive on the wire (the serialized message, before it is parsed).

The benchmark spreads N streams over several of these processes so that the clients are not what
is measured; each reports its own CPU time so that the report can show it.

Driven by lines on stdin, answering on stdout (one line each, ``time.time()`` wall clocks, so that
processes on one machine can be compared):
  ``connect``  open every stream; once each has a route (or ``--ready-timeout`` passed):
               ``ready SERVED T_LAST CPU ENDED RETRIES``: ENDED is a JSON object, how many streams
               ended and how (the gRPC status code name, ``EOF`` for an OK end), RETRIES how many
               streams were opened again after one ended
  ``mark``     remember every stream's route version; answers ``marked``. Once every served stream
               has received a different route version (or ``--change-timeout`` passed):
               ``changed COUNT T_LAST T_FIRST CPU BYTES MAX_BYTES`` (CPU: this process's seconds since
               ``mark``; BYTES: response bytes all streams received since ``mark``, MAX_BYTES: the
               most one stream received)
  ``count``    ``count BYTES MAX_BYTES`` since ``mark``, now: what arrived after ``changed`` too
  ``quit`` or end of input: close everything and exit.

A stream that ends is opened again after a jittered exponential backoff (0.5 s doubling up to 30 s,
as Envoy retries its ADS stream), unless ``--no-retry``; either way every end is counted and
reported, and logged on stderr (the first few in full), with a progress line every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
RETRY_BASE = 0.5  # seconds: Envoy's ADS stream backoff, jittered, doubling up to RETRY_MAX
RETRY_MAX = 30.0
ENDS_LOGGED = 20  # ended streams logged in full (status and details) per process


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (every stream is a socket); returns it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _names(type_url: str, resources: list[Any]) -> list[str]:
    """The EDS cluster names of CDS resources, or the RDS names of LDS resources (packed Anys)."""
    if type_url == CDS:
        out = []
        for packed in resources:
            cluster = cluster_pb2.Cluster()
            packed.Unpack(cluster)
            if cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS:
                out.append(cluster.name)
        return out
    routes = []
    for packed in resources:
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                network_filter.typed_config.Unpack(hcm)
                routes.append(hcm.rds.route_config_name)
    return routes


class Fleet:
    """What every stream of this process has seen, and the two waits the driver asks for."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.route_version: dict[int, str] = {}  # stream -> last RDS version received
        self.first_route_at: dict[int, float] = {}
        self.marked: dict[int, str] | None = None
        self.changed_at: dict[int, float] = {}
        self.progress = asyncio.Event()
        self.ended: dict[str, int] = {}  # status code name ("EOF": ended OK) -> streams ended
        self.retries = 0
        self.started = time.time()
        self.bytes: dict[int, int] = {}  # stream -> response bytes received since ``mark``

    def on_end(self, index: int, code: str, details: str) -> None:
        self.ended[code] = self.ended.get(code, 0) + 1
        if sum(self.ended.values()) <= ENDS_LOGGED:
            routed = "after" if index in self.first_route_at else "before"
            print(f"stream bench-{index} ended {code} {routed} its first route, {time.time() - self.started:.1f}s "
                  f"after connect: {details}", file=sys.stderr, flush=True)  # fmt: skip

    async def log_progress(self) -> None:
        """Every 5 s on stderr: streams with a route, and the ends so far."""
        while True:
            await asyncio.sleep(5)
            print(f"{time.time() - self.started:.0f}s: routed {len(self.first_route_at)}/{self.streams} "
                  f"ended {json.dumps(self.ended, sort_keys=True)} retries {self.retries}",
                  file=sys.stderr, flush=True)  # fmt: skip

    def on_route(self, index: int, version: str) -> None:
        now = time.time()
        self.route_version[index] = version
        self.first_route_at.setdefault(index, now)
        if self.marked is not None and index not in self.changed_at and self.marked.get(index) != version:
            self.changed_at[index] = now
        self.progress.set()

    def received(self, index: int, size: int) -> None:
        self.bytes[index] = self.bytes.get(index, 0) + size

    def byte_counts(self) -> str:
        """``BYTES MAX_BYTES`` since ``mark``: all streams, and the stream that received most."""
        return f"{sum(self.bytes.values())} {max(self.bytes.values(), default=0)}"

    def mark(self) -> None:
        self.marked = dict(self.route_version)
        self.changed_at = {}
        self.bytes = {}

    async def wait(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.progress.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self.progress.wait(), left)
            except TimeoutError:
                return


def _counted(response_type: Any) -> Callable[[bytes], tuple[int, Any]]:
    """A deserializer that keeps the size on the wire next to the parsed response."""

    def parse(raw: bytes) -> tuple[int, Any]:
        return len(raw), response_type.FromString(raw)

    return parse


def _call(channel: grpc.aio.Channel, method: str, request_type: Any, response_type: Any) -> Any:
    """An ADS stream whose reads yield ``(bytes on the wire, response)``."""
    return channel.stream_stream(
        ADS + method, request_serializer=request_type.SerializeToString, response_deserializer=_counted(response_type)
    )()


async def proxy(channel: grpc.aio.Channel, index: int, fleet: Fleet) -> None:
    """One state-of-the-world stream, asking as Envoy does."""
    call = _call(channel, "StreamAggregatedResources", discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse)
    node = base_pb2.Node(id=f"bench-{index}", cluster="edge")
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=LDS))
    subscribed: dict[str, list[str]] = {EDS: [], RDS: []}
    nonces: dict[str, str] = {}
    while True:
        read = await call.read()
        if read is grpc.aio.EOF:
            return
        size, response = read
        fleet.received(index, size)
        nonces[response.type_url] = response.nonce
        await call.write(discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce, version_info=response.version_info,
            resource_names=subscribed.get(response.type_url, []),
        ))  # fmt: skip
        if response.type_url in (CDS, LDS):
            below = EDS if response.type_url == CDS else RDS
            names = _names(response.type_url, list(response.resources))
            if names != subscribed[below]:
                subscribed[below] = names
                await call.write(discovery_pb2.DiscoveryRequest(
                    type_url=below, resource_names=names, response_nonce=nonces.get(below, "")
                ))  # fmt: skip
        elif response.type_url == RDS:
            fleet.on_route(index, response.version_info)


async def delta_proxy(channel: grpc.aio.Channel, index: int, fleet: Fleet) -> None:
    """One incremental stream, asking as Envoy does with ``api_type: DELTA_GRPC``: wildcard CDS and LDS
    (a first request naming nothing), then EDS and RDS by name as clusters and listeners arrive; the
    EDS name of a removed cluster is unsubscribed. A route's version is its resource's version."""
    call = _call(channel, "DeltaAggregatedResources", discovery_pb2.DeltaDiscoveryRequest,
                 discovery_pb2.DeltaDiscoveryResponse)  # fmt: skip
    node = base_pb2.Node(id=f"bench-{index}", cluster="edge")
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, node=node))
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=LDS))
    subscribed: dict[str, set[str]] = {EDS: set(), RDS: set()}
    while True:
        read = await call.read()
        if read is grpc.aio.EOF:
            return
        size, response = read
        fleet.received(index, size)
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce))
        if response.type_url in (CDS, LDS):
            below = EDS if response.type_url == CDS else RDS
            new = set(_names(response.type_url, [r.resource for r in response.resources])) - subscribed[below]
            gone = set(response.removed_resources) & subscribed[below] if below == EDS else set()
            if new or gone:
                subscribed[below] = (subscribed[below] | new) - gone
                await call.write(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=below, resource_names_subscribe=sorted(new), resource_names_unsubscribe=sorted(gone)
                ))  # fmt: skip
        elif response.type_url == RDS:
            for resource in response.resources:
                fleet.on_route(index, resource.version)


async def envoy(channel: grpc.aio.Channel, index: int, fleet: Fleet, retry: bool, delta: bool) -> None:
    """One proxy: its stream, counted when it ends, and opened again after a backoff (``retry``)."""
    delay = RETRY_BASE
    while True:
        try:
            await (delta_proxy if delta else proxy)(channel, index, fleet)
            code, details = "EOF", "the server ended the stream with status OK"
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, str(exc.details())
        fleet.on_end(index, code, details)
        if not retry:
            return
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(2 * delay, RETRY_MAX)
        fleet.retries += 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--first-index", type=int, default=0, help="node ids are bench-<first-index + i>")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--change-timeout", type=float, default=120.0)
    parser.add_argument("--no-retry", action="store_true", help="a stream that ends stays ended (counted)")
    parser.add_argument("--protocol", choices=("sotw", "delta"), default="sotw", help="the ADS variant to speak")
    args = parser.parse_args()
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    fleet = Fleet(args.streams)
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("loaded", flush=True)
    try:
        while line := (await stdin.readline()).decode().strip():
            if line == "connect":
                fleet.started = time.time()
                tasks.append(asyncio.create_task(fleet.log_progress()))
                for i in range(args.streams):
                    # a local subchannel pool: each channel its own connection, as each Envoy has
                    channel = grpc.aio.insecure_channel(
                        f"127.0.0.1:{args.port}", options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                    channels.append(channel)
                    tasks.append(asyncio.create_task(envoy(
                        channel, args.first_index + i, fleet, not args.no_retry, args.protocol == "delta"
                    )))
                await fleet.wait(lambda: len(fleet.first_route_at) == args.streams, args.ready_timeout)
                last = max(fleet.first_route_at.values(), default=0.0)
                print(f"ready {len(fleet.first_route_at)} {last:.6f} {time.process_time():.4f} "
                      f"{json.dumps(fleet.ended, sort_keys=True, separators=(',', ':'))} {fleet.retries}",
                      flush=True)  # fmt: skip
            elif line == "mark":
                fleet.mark()
                cpu = time.process_time()
                print("marked", flush=True)
                await fleet.wait(lambda: len(fleet.changed_at) >= len(fleet.first_route_at), args.change_timeout)
                times = fleet.changed_at.values()
                print(f"changed {len(fleet.changed_at)} {max(times, default=0.0):.6f} "
                      f"{min(times, default=0.0):.6f} {time.process_time() - cpu:.4f} {fleet.byte_counts()}",
                      flush=True)  # fmt: skip
            elif line == "count":
                print(f"count {fleet.byte_counts()}", flush=True)
            elif line == "quit":
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


if __name__ == "__main__":
    asyncio.run(main())
