"""A fake ADS proxy that withholds its ACK of one route weight until the test releases it.

``GatingProxy(xds_port, route, cluster="shop-v2", weight=30)`` subscribes like Envoy (wildcard CDS,
EDS for every cluster it is sent, RDS for ``route``), as tests/rig/holding_proxy.HoldingProxy does,
and ACKs everything except the RDS responses in which ``cluster`` has ``weight``: those are held
(counted, never ACKed) until :meth:`release`, which ACKs the latest held response if it is still the
latest response of its type. After the release every response is ACKed.

It shows that a control plane waits for *every* proxy before it counts a weight as applied: while
this proxy holds, a step at ``weight`` must not start its clock, however long Envoy has had it.
"""

from __future__ import annotations

import asyncio
import time

from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from tests.rig.ads_client import AdsClient
from tests.rig.holding_proxy import HoldingProxy


def route_weights(response: discovery_pb2.DiscoveryResponse, route: str) -> dict[str, int]:
    """{cluster: weight} of the first weighted route in each virtual host of ``route``."""
    weights: dict[str, int] = {}
    for resource in response.resources:
        config = route_pb2.RouteConfiguration.FromString(resource.value)
        if config.name != route:
            continue
        for vhost in config.virtual_hosts:
            for entry in vhost.routes[:1]:
                weights.update({c.name: c.weight.value for c in entry.route.weighted_clusters.clusters})
                if entry.route.cluster:
                    weights[entry.route.cluster] = 100
    return weights


class GatingProxy(HoldingProxy):
    def __init__(
        self,
        xds_port: int,
        route: str,
        cluster: str,
        weight: int,
        node_id: str = "gating-proxy",
        node_cluster: str = "edge",
        retry_interval: float = 0.2,
    ) -> None:
        super().__init__(xds_port, cluster, route, node_id, node_cluster, retry_interval)
        self.weight = weight
        self.released = False
        self.released_at: float | None = None  # time.time() when the held ACK was sent
        self._latest_route: discovery_pb2.DiscoveryResponse | None = None
        self._held: discovery_pb2.DiscoveryResponse | None = None

    def release(self, timeout: float = 10.0) -> float:
        """ACK the held route now (if it is still the latest) and every response after it.

        Returns time.time() at which the ACK was handed to the stream."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("gating proxy not started")

        async def ack_held() -> float:
            self.released = True
            held, client = self._held, self._client
            if held is not None and client is not None and held is self._latest_route:
                client.ack(held, [self.route])
                self._count_ack(typeurls.ROUTE)
            self.released_at = time.time()
            return self.released_at

        return asyncio.run_coroutine_threadsafe(ack_held(), loop).result(timeout)

    def _hold(self, response: discovery_pb2.DiscoveryResponse, clusters: set[str]) -> bool:
        return not self.released and route_weights(response, self.route).get(self.held_cluster) == self.weight

    def _on_route(self, client: AdsClient, response: discovery_pb2.DiscoveryResponse) -> None:
        self._latest_route = response
        super()._on_route(client, response)

    def _held_response(self, response: discovery_pb2.DiscoveryResponse) -> None:
        self._held = response
