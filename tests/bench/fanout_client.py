"""Hold N ADS streams that behave like Envoy (wildcard CDS/LDS, named EDS/RDS, ACK everything).

    python -m tests.bench.fanout_client PORT --streams 1000     (from the repository root)
Prints "ready" once every stream has ACKed a route, then one line per later route ACK round:
"acked <route version> <count>" is not printed (too many); the server side measures instead.
Runs until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def _names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    if response.type_url == CDS:
        out = []
        for packed in response.resources:
            cluster = cluster_pb2.Cluster()
            packed.Unpack(cluster)
            if cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS:
                out.append(cluster.name)
        return out
    routes = []
    for packed in response.resources:
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                network_filter.typed_config.Unpack(hcm)
                routes.append(hcm.rds.route_config_name)
    return routes


async def proxy(stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, index: int, on_route: asyncio.Queue[int]) -> None:
    call = stub.StreamAggregatedResources()
    node = base_pb2.Node(id=f"bench-{index}", cluster="edge")
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=LDS))
    subscribed: dict[str, list[str]] = {EDS: [], RDS: []}
    nonces: dict[str, str] = {}
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            return
        nonces[response.type_url] = response.nonce
        await call.write(discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce, version_info=response.version_info,
            resource_names=subscribed.get(response.type_url, []),
        ))  # fmt: skip
        if response.type_url in (CDS, LDS):
            below = EDS if response.type_url == CDS else RDS
            names = _names(response)
            if names != subscribed[below]:
                subscribed[below] = names
                await call.write(discovery_pb2.DiscoveryRequest(
                    type_url=below, resource_names=names, response_nonce=nonces.get(below, "")
                ))  # fmt: skip
        elif response.type_url == RDS:
            on_route.put_nowait(index)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    routes: asyncio.Queue[int] = asyncio.Queue()
    tasks = [asyncio.create_task(proxy(stubs[i % len(stubs)], i, routes)) for i in range(args.streams)]
    seen: set[int] = set()
    while len(seen) < args.streams:
        seen.add(await routes.get())
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    asyncio.run(main())
