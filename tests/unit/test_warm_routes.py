"""A route goes to a stream only once the stream has ACKed the clusters it names and their
endpoints (aviary.discovery.warm_routes, in SotwStream).

The case it is for: an Envoy that was away while a canary started (a restarted control plane, a
replaced xDS worker) reconnects and asks for every type at once. Answering each as it comes gave it
the canary's cluster and the route to it together, and Envoy answered 503 (no cluster) while the
cluster warmed; seen as one failed request in tests/e2e/test_xds_workers.py.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.proxy_events import ProxyEvent
from aviary.discovery.resources import PublishedRollout, build_snapshot, cluster_name
from aviary.discovery.snapshot import Snapshot
from aviary.discovery.sotw import SotwStream
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
LISTENER = ListenerSpec(address="0.0.0.0", port=10000)
OLD, CANARY = cluster_name("shop", "v1"), cluster_name("shop", "v2")
ROUTE, GRPC_ROUTE = "route-0.0.0.0-10000", "grpc-shop"  # Envoy's route; a gRPC client's (api_listener)


def stable() -> Snapshot:
    return build_snapshot([PublishedRollout.of("shop", LISTENER, ("*",), ((V1, 100),), (V1,))])


def canary(weight: int) -> Snapshot:
    return build_snapshot([PublishedRollout.of("shop", LISTENER, ("*",), ((V1, 100 - weight), (V2, weight)), (V1, V2))])


def assignment(snapshot: Snapshot, cluster: str) -> str:
    (name,) = snapshot.items(typeurls.CLUSTER)[cluster].references
    return name


class Envoyish:
    """One stream fed like Envoy: wildcard CDS and LDS, EDS and RDS by name."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.events: list[ProxyEvent] = []
        self.stream = SotwStream(1, "peer", cache, self.events.append)
        self.nonces: dict[str, str] = {}
        self.node = base_pb2.Node(id="envoy-1", cluster="edge")

    def ask(self, type_url: str, names: list[str] | None = None) -> list[discovery_pb2.DiscoveryResponse]:
        """A request (the ACK of the latest response of the type, if any); the responses it gets."""
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names or [], response_nonce=self.nonces.get(type_url, ""), node=self.node
        )
        responses = [discovery_pb2.DiscoveryResponse.FromString(r) for r in self.stream.on_request(request)]
        for response in responses:
            self.nonces[response.type_url] = response.nonce
        return responses

    def changed(self) -> list[discovery_pb2.DiscoveryResponse]:
        responses = [discovery_pb2.DiscoveryResponse.FromString(r) for r in self.stream.on_snapshot_changed()]
        for response in responses:
            self.nonces[response.type_url] = response.nonce
        return responses


def types(responses: list[discovery_pb2.DiscoveryResponse]) -> list[str]:
    return [typeurls.short_name(r.type_url) for r in responses]


def weights(response: discovery_pb2.DiscoveryResponse) -> dict[str, int]:
    (resource,) = response.resources
    config = route_pb2.RouteConfiguration.FromString(resource.value)
    action = config.virtual_hosts[0].routes[-1].route
    if action.cluster:
        return {action.cluster: 100}
    return {c.name: c.weight.value for c in action.weighted_clusters.clusters}


def test_a_reconnecting_envoy_gets_the_route_after_the_new_cluster_and_its_endpoints() -> None:
    cache = SnapshotCache()
    cache.publish({"": canary(10)})  # published while this Envoy was away
    snapshot = cache.snapshot_for("edge")
    route = ROUTE
    envoy = Envoyish(cache)
    # Envoy's requests on a new stream, all at once: what it had (v1) before it went away.
    assert types(envoy.ask(typeurls.CLUSTER)) == ["CDS"]  # v1 and v2
    assert types(envoy.ask(typeurls.ENDPOINT, [assignment(snapshot, OLD)])) == ["EDS"]
    assert types(envoy.ask(typeurls.LISTENER)) == ["LDS"]
    assert envoy.ask(typeurls.ROUTE, [route]) == []  # held: v2 is not ACKed here yet
    assert envoy.ask(typeurls.CLUSTER) == []  # v2 ACKed, its endpoints not yet
    endpoints = [assignment(snapshot, OLD), assignment(snapshot, CANARY)]
    assert types(envoy.ask(typeurls.ENDPOINT, endpoints)) == ["EDS"]  # the ACK and the new name
    answer = envoy.ask(typeurls.ENDPOINT, endpoints)  # the ACK of v2's endpoints: the route follows
    assert types(answer) == ["RDS"]
    assert weights(answer[0]) == {OLD: 90, CANARY: 10}


def test_a_connected_envoy_gets_a_new_weight_at_once() -> None:
    cache = SnapshotCache()
    cache.publish({"": canary(10)})
    snapshot = cache.snapshot_for("edge")
    route = ROUTE
    envoy = Envoyish(cache)
    endpoints = [assignment(snapshot, OLD), assignment(snapshot, CANARY)]
    for type_url, names in ((typeurls.CLUSTER, None), (typeurls.ENDPOINT, endpoints), (typeurls.LISTENER, None)):
        envoy.ask(type_url, names)
        envoy.ask(type_url, names)  # the ACK
    assert types(envoy.ask(typeurls.ROUTE, [route])) == ["RDS"]
    envoy.ask(typeurls.ROUTE, [route])
    cache.publish({"": canary(30)})
    (pushed,) = envoy.changed()
    assert weights(pushed) == {OLD: 70, CANARY: 30}


def test_a_route_held_for_a_cluster_goes_once_a_new_snapshot_no_longer_needs_it() -> None:
    cache = SnapshotCache()
    cache.publish({"": canary(10)})
    snapshot = cache.snapshot_for("edge")
    route = ROUTE
    envoy = Envoyish(cache)
    envoy.ask(typeurls.CLUSTER)
    envoy.ask(typeurls.ENDPOINT, [assignment(snapshot, OLD)])
    envoy.ask(typeurls.CLUSTER)  # the ACK (v1 and v2)
    envoy.ask(typeurls.ENDPOINT, [assignment(snapshot, OLD)])  # the ACK (v1's endpoints)
    assert envoy.ask(typeurls.ROUTE, [route]) == []  # v2's endpoints are not ACKed
    cache.publish({"": stable()})  # rolled back meanwhile: the route needs v1 only
    assert "RDS" in types(envoy.changed())


def test_a_client_that_asks_for_clusters_after_routes_is_not_held() -> None:
    """A gRPC client: LDS, RDS, then CDS for the clusters its route names."""
    cache = SnapshotCache()
    cache.publish({"": canary(10)})
    route = GRPC_ROUTE
    client = Envoyish(cache)
    assert types(client.ask(typeurls.ROUTE, [route])) == ["RDS"]
    client.ask(typeurls.CLUSTER, [OLD])  # by name, not yet the canary's
    client.ask(typeurls.CLUSTER, [OLD])
    cache.publish({"": canary(20)})
    assert types(client.changed()) == ["RDS"]  # CANARY is not in its subscription: nothing to wait for
