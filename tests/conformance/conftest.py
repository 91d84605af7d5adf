"""The conformance suite's rig: the real ADS server on 127.0.0.1 and clients of both protocols.

`plane` serves a `SnapshotCache` that a test fills with hand-built resources (`publish`); the
warming tests put Aviary's `TrafficDirector` in front of it (`Plane.director()`). The server's own
events are recorded, so "nothing more was sent" is read from its count of responses once the
request in question was handled (see tests/unit/test_ads_protocol.py for why that is final).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_events import ProxyConnected, ProxyEvent, ResponseSent
from aviary.discovery.proxy_status import ProxyStatus, ProxyView
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.discovery.snapshot import Resource, Snapshot
from tests.conformance.clients import PROTOCOLS, DeltaClient, SotwClient, new_client
from tests.rig.waiting import async_wait_until

LDS, RDS, CDS, EDS = typeurls.LISTENER, typeurls.ROUTE, typeurls.CLUSTER, typeurls.ENDPOINT


def cluster(name: str, timeout: int = 1) -> Resource:
    message = cluster_pb2.Cluster(name=name)
    message.connect_timeout.seconds = timeout
    return Resource.from_message(name, CDS, message)


def assignment(name: str, port: int = 9001) -> Resource:
    message = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    endpoint = message.endpoints.add().lb_endpoints.add().endpoint
    endpoint.address.socket_address.address = "127.0.0.1"
    endpoint.address.socket_address.port_value = port
    return Resource.from_message(name, EDS, message)


def listener(name: str, port: int = 10000, wildcard: bool = True) -> Resource:
    """`wildcard=False`: a listener sent only to clients that name it (as Aviary's gRPC api_listeners)."""
    message = listener_pb2.Listener(name=name)
    message.address.socket_address.address = "127.0.0.1"
    message.address.socket_address.port_value = port
    return Resource.from_message(name, LDS, message, wildcard=wildcard)


def route(name: str, host: str = "*") -> Resource:
    message = route_pb2.RouteConfiguration(name=name)
    message.virtual_hosts.add(name="vh", domains=[host])
    return Resource.from_message(name, RDS, message)


@dataclass
class Plane:
    cache: SnapshotCache
    proxies: ProxyStatus
    port: int
    protocol: str
    clients: list[SotwClient | DeltaClient] = field(default_factory=list)
    events: list[ProxyEvent] = field(default_factory=list)
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)  # (node id, type url) -> responses
    nodes: dict[int, str] = field(default_factory=dict)
    _director: TrafficDirector | None = None

    def record(self, event: ProxyEvent) -> None:
        if isinstance(event, ProxyConnected):
            self.nodes[event.stream_id] = event.node_id
        elif isinstance(event, ResponseSent):
            self.sent[self.nodes[event.stream_id], event.type_url] += 1
        self.events.append(event)
        self.proxies.apply(event)

    def client(
        self, node_id: str = "node-a", protocol: str | None = None, only: str | None = None
    ) -> SotwClient | DeltaClient:
        """A client on ADS, or with `only` on that type's own discovery service."""
        made = new_client(protocol or self.protocol, self.port, node_id, only=only)
        self.clients.append(made)
        return made

    def adopt(self, client: SotwClient | DeltaClient) -> SotwClient | DeltaClient:
        self.clients.append(client)
        return client

    def publish(self, *resources: Resource, group: str = "") -> None:
        self.cache.publish({group: Snapshot.of(resources)})

    def director(self) -> TrafficDirector:
        if self._director is None:
            self._director = TrafficDirector(self.cache, self.proxies)
        return self._director

    def responses(self, node_id: str, type_url: str) -> int:
        return self.sent[node_id, type_url]

    def proxy(self, node_id: str = "node-a") -> ProxyView | None:
        """The newest stream of `node_id` (an older one may not have been reported gone yet)."""
        streams = [p for p in self.proxies if p.node_id == node_id]
        return max(streams, key=lambda p: p.stream_id) if streams else None

    async def until(self, check: Callable[[], object], what: str) -> None:
        await async_wait_until(check, 5, what=what)

    async def until_acked(self, type_url: str, version_names: dict[str, str], node_id: str = "node-a") -> None:
        """Until the server recorded that `node_id` holds exactly `version_names` of `type_url`."""

        def acked() -> bool:
            proxy = self.proxy(node_id)
            return proxy is not None and dict(proxy.acked.get(type_url, {})) == version_names

        await self.until(acked, f"ACK of {typeurls.short_name(type_url)} {version_names}")


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def plane(protocol: str) -> AsyncIterator[Plane]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    state = Plane(cache, proxies, 0, protocol)
    server, state.port = await start_xds_server("127.0.0.1:0", AggregatedDiscoveryService(cache, state.record))
    try:
        yield state
    finally:
        for client in state.clients:
            await client.close()
        await server.stop(0)
