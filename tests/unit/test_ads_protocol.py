"""SotW ADS protocol rules, through a real grpc.aio server and an in-process client.

"Nothing more was sent" is asserted on the server's own count of responses per stream and type
(its ``ResponseSent`` events), read once the request or snapshot change in question has been
handled: a stream computes every response to a request (or to a snapshot change) in one
synchronous call and reports each before writing any, so the count is final at that point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_events import ProxyConnected, ProxyEvent, ResponseSent, SubscriptionChanged
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan
from tests.rig.ads_client import AdsClient
from tests.rig.waiting import async_wait_until

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
LISTENER = ListenerSpec(address="127.0.0.1", port=10000)
ROUTE = "route-127.0.0.1-10000"


@dataclass
class Plane:
    cache: SnapshotCache
    proxies: ProxyStatus
    director: TrafficDirector
    port: int
    clients: list[AdsClient]
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)  # (node id, short type) -> responses
    subscriptions: Counter[tuple[str, str]] = field(default_factory=Counter)  # subscription changes seen
    nodes: dict[int, str] = field(default_factory=dict)  # stream id -> node id

    def client(self, node_id: str = "node-a", node_cluster: str = "edge") -> AdsClient:
        client = AdsClient(self.port, node_id, node_cluster)
        self.clients.append(client)
        return client

    def record(self, event: ProxyEvent) -> None:
        """The server's events, counted per node and type, then handed to ProxyStatus as usual."""
        if isinstance(event, ProxyConnected):
            self.nodes[event.stream_id] = event.node_id
        elif isinstance(event, ResponseSent):
            self.sent[self.nodes[event.stream_id], typeurls.short_name(event.type_url)] += 1
        elif isinstance(event, SubscriptionChanged):
            self.subscriptions[self.nodes[event.stream_id], typeurls.short_name(event.type_url)] += 1
        self.proxies.apply(event)

    def responses(self, node_id: str = "node-a") -> dict[str, int]:
        """Responses the server has sent to ``node_id`` so far, by short type name."""
        return {t: n for (node, t), n in self.sent.items() if node == node_id}


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.set_rollout("checkout", Placement(LISTENER, ("*",)), TrafficPlan(V1))
    state = Plane(cache, proxies, director, 0, [])
    server, state.port = await start_xds_server("127.0.0.1:0", AggregatedDiscoveryService(cache, state.record))
    try:
        yield state
    finally:
        for client in state.clients:
            await client.close()
        await server.stop(0)


async def _acked(plane: Plane, client: AdsClient, response: object, names: tuple[str, ...] = ()) -> None:
    """ACK and wait until the server recorded it, so the next change is not raced by the ACK."""
    from envoy.service.discovery.v3 import discovery_pb2

    assert isinstance(response, discovery_pb2.DiscoveryResponse)
    client.ack(response, names)
    await async_wait_until(
        lambda: any(p.acked_versions.get(response.type_url) == response.version_info for p in plane.proxies),
        5,
        what=f"ACK of {response.type_url} {response.version_info}",
    )


def _names(response: object) -> list[str]:
    from envoy.service.discovery.v3 import discovery_pb2

    assert isinstance(response, discovery_pb2.DiscoveryResponse)
    out = []
    for resource in response.resources:
        if resource.type_url == typeurls.CLUSTER:
            message: cluster_pb2.Cluster | route_pb2.RouteConfiguration = cluster_pb2.Cluster()
        else:
            message = route_pb2.RouteConfiguration()
        resource.Unpack(message)
        out.append(message.name)
    return out


async def test_wildcard_cds_is_answered_and_ack_is_recorded(plane: Plane) -> None:
    client = plane.client()
    client.send(typeurls.CLUSTER)
    response = await client.receive()
    assert response.type_url == typeurls.CLUSTER
    assert response.nonce and response.version_info
    assert _names(response) == ["checkout_v1"]
    client.ack(response)
    await async_wait_until(
        lambda: any(p.acked_versions.get(typeurls.CLUSTER) == response.version_info for p in plane.proxies),
        5,
        what="ACK recorded",
    )
    assert plane.responses() == {"CDS": 1}  # the ACK (handled) of current content made nothing new to send


async def test_nack_is_recorded_and_not_resent_until_a_newer_version(plane: Plane) -> None:
    client = plane.client()
    client.send(typeurls.CLUSTER)
    first = await client.receive()
    await _acked(plane, client, first)
    plane.director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 0))
    second = await client.receive()
    assert sorted(_names(second)) == ["checkout_v1", "checkout_v2"]
    client.nack(second, "bad cluster")
    await async_wait_until(
        lambda: any(p.last_nack is not None for p in plane.proxies), 5, what="NACK recorded"
    )
    (proxy,) = list(plane.proxies)
    assert proxy.last_nack is not None
    assert proxy.last_nack.message == "bad cluster"
    assert proxy.last_nack.version == second.version_info
    assert proxy.acked_versions[typeurls.CLUSTER] == first.version_info  # still on its last good state
    assert plane.responses() == {"CDS": 2}  # the NACK (handled) made no resend of the rejected version
    v3 = Backend("v3", (Endpoint.model_validate("127.0.0.1:9003"),))
    plane.director.set_desired_traffic("checkout", TrafficPlan(V1, v3, 0))
    third = await client.receive()
    assert sorted(_names(third)) == ["checkout_v1", "checkout_v3"]
    assert third.version_info not in (first.version_info, second.version_info)


async def test_stale_nonce_is_ignored(plane: Plane) -> None:
    client = plane.client()
    client.send(typeurls.CLUSTER)
    first = await client.receive()
    plane.director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 0))
    second = await client.receive()
    client.nack(first, "late NACK of an old response")  # stale nonce: must not count
    client.ack(second)
    await async_wait_until(
        lambda: any(p.acked_versions.get(typeurls.CLUSTER) == second.version_info for p in plane.proxies),
        5,
        what="ACK of the latest response",
    )
    assert all(p.last_nack is None for p in plane.proxies)


async def test_named_subscription_to_missing_resource_is_sent_when_it_appears(plane: Plane) -> None:
    client = plane.client()
    client.send(typeurls.ROUTE, ["route-127.0.0.1-10001"])
    await async_wait_until(lambda: plane.subscriptions["node-a", "RDS"], 5, what="the RDS subscription handled")
    assert plane.responses() == {}  # nothing to send for a name that does not exist yet
    plane.director.set_rollout(
        "payments", Placement(ListenerSpec(address="127.0.0.1", port=10001), ("*",)), TrafficPlan(V1)
    )
    response = await client.receive()
    assert _names(response) == ["route-127.0.0.1-10001"]


async def test_sends_only_on_change(plane: Plane) -> None:
    client = plane.client()
    client.send(typeurls.ROUTE, [ROUTE])
    route = await client.receive()
    client.ack(route, [ROUTE])
    client.send(typeurls.CLUSTER)
    clusters = await client.receive()
    client.ack(clusters)
    # A new cluster changes CDS and EDS but not the route this client holds.
    plane.director.set_rollout("payments", Placement(ListenerSpec(address="127.0.0.1", port=10001), ("*",)),
                               TrafficPlan(V1))
    update = await client.receive()
    assert update.type_url == typeurls.CLUSTER
    assert plane.responses() == {"RDS": 1, "CDS": 2}  # the change's responses, all reported before the first
    await _acked(plane, client, update)
    assert plane.responses() == {"RDS": 1, "CDS": 2}
    # A weight change is one RDS update and nothing else.
    plane.director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 0))
    cds = await client.receive()
    assert cds.type_url == typeurls.CLUSTER
    client.ack(cds)
    client.send(typeurls.ENDPOINT, ["checkout_v1", "checkout_v2"])  # as Envoy does for new clusters
    eds = await client.receive()
    client.ack(eds, ["checkout_v1", "checkout_v2"])
    rds = await client.receive()
    assert rds.type_url == typeurls.ROUTE
    client.ack(rds, [ROUTE])
    sent_before = plane.responses()
    plane.director.set_canary_weight("checkout", 30)
    only = await client.receive()
    assert only.type_url == typeurls.ROUTE
    assert plane.responses() == {**sent_before, "RDS": sent_before["RDS"] + 1}  # one RDS response, nothing else


async def test_proxy_cluster_groups_see_only_their_rollouts(plane: Plane) -> None:
    plane.director.set_rollout(
        "internal",
        Placement(ListenerSpec(address="127.0.0.1", port=10002), ("*",), proxy_cluster="mesh"),
        TrafficPlan(V1),
    )
    edge, mesh = plane.client("edge-1", "edge"), plane.client("mesh-1", "mesh")
    edge.send(typeurls.CLUSTER)
    mesh.send(typeurls.CLUSTER)
    assert sorted(_names(await edge.receive())) == ["checkout_v1"]
    assert sorted(_names(await mesh.receive())) == ["checkout_v1", "internal_v1"]


async def test_first_request_without_node_is_refused(plane: Plane) -> None:
    client = plane.client()
    client.send(typeurls.CLUSTER, node=False)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await client.receive()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node" in (failure.value.details() or "")


def test_an_ack_repeated_with_a_subscription_change_is_reported_once() -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from aviary.discovery.proxy_events import ResourcesAcked
    from aviary.discovery.sotw import SotwStream

    cache, proxies = SnapshotCache(), ProxyStatus()
    TrafficDirector(cache, proxies).set_rollout("checkout", Placement(LISTENER, ("*",)), TrafficPlan(V1, V2, 10))
    events: list[ProxyEvent] = []
    stream = SotwStream(1, "peer", cache, events.append)
    (data,) = stream.on_request(discovery_pb2.DiscoveryRequest(
        type_url=typeurls.ENDPOINT, resource_names=["checkout_v1"], node=base_pb2.Node(id="n")))
    response = discovery_pb2.DiscoveryResponse.FromString(data)
    for names in (["checkout_v1"], ["checkout_v1", "checkout_v2"]):  # Envoy repeats the nonce
        stream.on_request(discovery_pb2.DiscoveryRequest(
            type_url=typeurls.ENDPOINT, resource_names=names, response_nonce=response.nonce))
    assert sum(isinstance(e, ResourcesAcked) for e in events) == 1


async def test_the_reader_handles_a_request_only_when_nothing_is_queued_before_it() -> None:
    """An ACK with nothing queued is handled by the reader (no switch to the stream's coroutine); with
    a snapshot change queued before it, it is queued behind it, so responses go out in the order
    they were computed (a proxy must never apply an older response last)."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from aviary.discovery.proxy_events import ResourcesAcked
    from aviary.discovery.server import _END, _WAKE, _Inbox
    from aviary.discovery.sotw import SotwStream

    cache, proxies = SnapshotCache(), ProxyStatus()
    TrafficDirector(cache, proxies).set_rollout("checkout", Placement(LISTENER, ("*",)), TrafficPlan(V1))
    events: list[ProxyEvent] = []
    stream = SotwStream(1, "peer", cache, events.append)
    (data,) = stream.on_request(discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER, node=base_pb2.Node(id="n")))
    ack = discovery_pb2.DiscoveryRequest(
        type_url=typeurls.CLUSTER, response_nonce=discovery_pb2.DiscoveryResponse.FromString(data).nonce)

    async def requests(*items: discovery_pb2.DiscoveryRequest) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        for item in items:
            yield item

    idle = _Inbox()
    await AggregatedDiscoveryService._read(requests(ack), idle, stream)
    assert [type(e) for e in events if isinstance(e, ResourcesAcked)] == [ResourcesAcked]  # handled by the reader
    assert await idle.get() is _END  # and nothing else was queued

    busy = _Inbox()
    busy.put_nowait(_WAKE)
    await AggregatedDiscoveryService._read(requests(ack), busy, stream)
    assert await busy.get() is _WAKE
    assert await busy.get() is ack  # queued behind the change, for the coroutine
    assert await busy.get() is _END

