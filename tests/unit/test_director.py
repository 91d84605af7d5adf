"""Make-before-break in the traffic director, driven by fake proxy events (no sockets)."""

from __future__ import annotations

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, RolloutNack, TrafficDirector
from aviary.discovery.proxy_events import ProxyConnected, ResourcesAcked, ResourcesNacked, SubscriptionChanged
from aviary.discovery.proxy_status import ProxyStatus
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, DesiredTraffic

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
PLACEMENT = Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",))
ROUTE = "route-127.0.0.1-10000"


class FakeEnvoy:
    """Subscribes like Envoy (wildcard CDS/LDS, named EDS/RDS) and ACKs exactly what it is told."""

    def __init__(self, cache: SnapshotCache, proxies: ProxyStatus, stream_id: int = 1) -> None:
        self.cache, self.proxies, self.stream_id = cache, proxies, stream_id
        proxies.apply(ProxyConnected(stream_id, f"envoy-{stream_id}", "edge", "peer", 0.0))
        proxies.apply(SubscriptionChanged(stream_id, typeurls.CLUSTER, True, frozenset()))
        proxies.apply(SubscriptionChanged(stream_id, typeurls.ROUTE, False, frozenset({ROUTE})))

    def ack(self, type_url: str) -> None:
        snapshot = self.cache.snapshot_for("edge")
        if type_url == typeurls.ENDPOINT:
            names = frozenset(snapshot.items(typeurls.CLUSTER))
            self.proxies.apply(SubscriptionChanged(self.stream_id, type_url, False, names))
        proxy = self.proxies.get(self.stream_id)
        assert proxy is not None
        chosen = snapshot.select(type_url, proxy.subscription(type_url).names, proxy.subscription(type_url).wildcard)
        self.proxies.apply(
            ResourcesAcked(self.stream_id, type_url, "v", {n: r.version for n, r in chosen.items()}, 0.0, 0.0)
        )

    def clusters(self) -> set[str]:
        return set(self.cache.snapshot_for("edge").items(typeurls.CLUSTER))


def _setup() -> tuple[SnapshotCache, ProxyStatus, TrafficDirector]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.set_rollout("checkout", PLACEMENT, DesiredTraffic(V1))
    return cache, proxies, director


def test_without_proxies_a_switch_completes_at_once() -> None:
    cache, _, director = _setup()
    director.set_desired_traffic("checkout", DesiredTraffic(V2))
    assert director.published_route("checkout") == {"v2": 100}
    assert set(cache.snapshot_for("edge").items(typeurls.CLUSTER)) == {"checkout-v2"}


def test_route_waits_for_cluster_and_endpoints_ack_then_old_cluster_waits_for_route_ack() -> None:
    cache, proxies, director = _setup()
    envoy = FakeEnvoy(cache, proxies)
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)

    director.set_desired_traffic("checkout", DesiredTraffic(V2))
    assert envoy.clusters() == {"checkout-v1", "checkout-v2"}
    assert director.published_route("checkout") == {"v1": 100}  # new cluster not ACKed yet

    envoy.ack(typeurls.CLUSTER)
    assert director.published_route("checkout") == {"v1": 100}  # its endpoints not ACKed yet
    envoy.ack(typeurls.ENDPOINT)
    assert director.published_route("checkout") == {"v2": 100}
    assert envoy.clusters() == {"checkout-v1", "checkout-v2"}  # route not ACKed yet

    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout-v2"}
    assert director.acked("checkout") == DesiredTraffic(V2)


def test_acked_listener_fires_once_per_desired_traffic() -> None:
    cache, proxies, director = _setup()
    envoy = FakeEnvoy(cache, proxies)
    seen: list[DesiredTraffic] = []
    director.on_traffic_acked(lambda name, traffic: seen.append(traffic))
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)
    director.set_desired_traffic("checkout", DesiredTraffic(V1, V2, 10))
    envoy.ack(typeurls.CLUSTER)
    envoy.ack(typeurls.ENDPOINT)
    assert DesiredTraffic(V1, V2, 10) not in seen
    envoy.ack(typeurls.ROUTE)
    envoy.ack(typeurls.ROUTE)
    assert seen.count(DesiredTraffic(V1, V2, 10)) == 1


def test_nack_of_a_rollout_resource_is_reported_for_that_rollout() -> None:
    cache, proxies, director = _setup()
    FakeEnvoy(cache, proxies)
    nacks: list[RolloutNack] = []
    director.on_nack(nacks.append)
    proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "v9", {ROUTE: "x"}, "bad route", 0.0))
    assert nacks == [RolloutNack("checkout", "envoy-1", typeurls.ROUTE, "bad route")]


def test_proxy_cluster_rollout_is_gated_only_by_its_own_proxies() -> None:
    cache, proxies, director = _setup()
    FakeEnvoy(cache, proxies)  # an "edge" Envoy that never ACKs anything
    director.set_rollout("internal", Placement(ListenerSpec(address="127.0.0.1", port=10001), ("*",), "mesh"),
                         DesiredTraffic(V1))
    director.set_desired_traffic("internal", DesiredTraffic(V2))
    assert director.published_route("internal") == {"v2": 100}


def test_after_a_restart_gates_wait_for_the_proxies_served_before() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.expect_proxies({"envoy-1"}, grace=60)
    director.set_rollout("checkout", PLACEMENT, DesiredTraffic(V1, V2, 50))  # restored: published as is
    assert director.published_route("checkout") == {"v1": 50, "v2": 50}
    acked: list[DesiredTraffic] = []
    director.on_traffic_acked(lambda name, traffic: acked.append(traffic))

    director.set_desired_traffic("checkout", DesiredTraffic(V2))  # the step ended while Envoy is away
    assert director.published_route("checkout") == {"v1": 50, "v2": 50}  # no proxy has confirmed anything
    assert acked == []

    envoy = FakeEnvoy(cache, proxies)  # Envoy is back
    envoy.ack(typeurls.CLUSTER)
    envoy.ack(typeurls.ENDPOINT)
    assert director.published_route("checkout") == {"v2": 100}
    assert envoy.clusters() == {"checkout-v1", "checkout-v2"}  # v1 kept until the new route is ACKed
    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout-v2"}
    assert acked == [DesiredTraffic(V2)]


def test_reconnect_grace_expires() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.expect_proxies({"gone-for-good"}, grace=0)
    director.set_rollout("checkout", PLACEMENT, DesiredTraffic(V1))
    director.set_desired_traffic("checkout", DesiredTraffic(V2))
    assert director.published_route("checkout") == {"v2": 100}


def test_removal_is_make_before_break() -> None:
    cache, proxies, director = _setup()
    director.set_rollout("payments", PLACEMENT.__class__(PLACEMENT.listener, ("pay.example.com",)),
                         DesiredTraffic(V1))
    envoy = FakeEnvoy(cache, proxies)
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)
    director.remove_rollout("payments")
    route = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    assert "payments-v1" not in route.references  # the virtual host is gone at once
    assert "payments-v1" in envoy.clusters()  # its cluster stays until the route is ACKed
    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout-v1"}
    assert director.rollout_names() == ["checkout"]
