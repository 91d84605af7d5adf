"""Make-before-break in the traffic director, driven by fake proxy events (no sockets)."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, PublishedState, RolloutNack, TrafficDirector
from aviary.discovery.proxy_events import ProxyConnected, ResourcesAcked, ResourcesNacked, SubscriptionChanged
from aviary.discovery.proxy_status import ProxyStatus
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan

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
    director.set_rollout("checkout", PLACEMENT, TrafficPlan(V1))
    return cache, proxies, director


def test_without_proxies_a_switch_completes_at_once() -> None:
    cache, _, director = _setup()
    director.set_desired_traffic("checkout", TrafficPlan(V2))
    assert director.published_route("checkout") == {"v2": 100}
    assert set(cache.snapshot_for("edge").items(typeurls.CLUSTER)) == {"checkout_v2"}


def test_route_waits_for_cluster_and_endpoints_ack_then_old_cluster_waits_for_route_ack() -> None:
    cache, proxies, director = _setup()
    envoy = FakeEnvoy(cache, proxies)
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)

    director.set_desired_traffic("checkout", TrafficPlan(V2))
    assert envoy.clusters() == {"checkout_v1", "checkout_v2"}
    assert director.published_route("checkout") == {"v1": 100}  # new cluster not ACKed yet

    envoy.ack(typeurls.CLUSTER)
    assert director.published_route("checkout") == {"v1": 100}  # its endpoints not ACKed yet
    envoy.ack(typeurls.ENDPOINT)
    assert director.published_route("checkout") == {"v2": 100}
    assert envoy.clusters() == {"checkout_v1", "checkout_v2"}  # route not ACKed yet

    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout_v2"}
    assert director.acked("checkout") == TrafficPlan(V2)


def test_acked_listener_fires_once_per_desired_traffic() -> None:
    cache, proxies, director = _setup()
    envoy = FakeEnvoy(cache, proxies)
    seen: list[TrafficPlan] = []
    director.on_traffic_acked(lambda name, traffic: seen.append(traffic))
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)
    director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 10))
    envoy.ack(typeurls.CLUSTER)
    envoy.ack(typeurls.ENDPOINT)
    assert TrafficPlan(V1, V2, 10) not in seen
    envoy.ack(typeurls.ROUTE)
    envoy.ack(typeurls.ROUTE)
    assert seen.count(TrafficPlan(V1, V2, 10)) == 1


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
                         TrafficPlan(V1))
    director.set_desired_traffic("internal", TrafficPlan(V2))
    assert director.published_route("internal") == {"v2": 100}


def test_after_a_restart_gates_wait_for_the_proxies_served_before() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.expect_proxies({"envoy-1"}, grace=60)
    director.set_rollout("checkout", PLACEMENT, TrafficPlan(V1, V2, 50))  # restored: published as is
    assert director.published_route("checkout") == {"v1": 50, "v2": 50}
    acked: list[TrafficPlan] = []
    director.on_traffic_acked(lambda name, traffic: acked.append(traffic))

    director.set_desired_traffic("checkout", TrafficPlan(V2))  # the step ended while Envoy is away
    assert director.published_route("checkout") == {"v1": 50, "v2": 50}  # no proxy has confirmed anything
    assert acked == []

    envoy = FakeEnvoy(cache, proxies)  # Envoy is back
    envoy.ack(typeurls.CLUSTER)
    envoy.ack(typeurls.ENDPOINT)
    assert director.published_route("checkout") == {"v2": 100}
    assert envoy.clusters() == {"checkout_v1", "checkout_v2"}  # v1 kept until the new route is ACKed
    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout_v2"}
    assert acked == [TrafficPlan(V2)]


def test_reconnect_grace_expires() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.expect_proxies({"gone-for-good"}, grace=0)
    director.set_rollout("checkout", PLACEMENT, TrafficPlan(V1))
    director.set_desired_traffic("checkout", TrafficPlan(V2))
    assert director.published_route("checkout") == {"v2": 100}


def test_removal_is_make_before_break() -> None:
    cache, proxies, director = _setup()
    director.set_rollout("payments", PLACEMENT.__class__(PLACEMENT.listener, ("pay.example.com",)),
                         TrafficPlan(V1))
    envoy = FakeEnvoy(cache, proxies)
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)
    director.remove_rollout("payments")
    route = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    assert "payments_v1" not in route.references  # the virtual host is gone at once
    assert "payments_v1" in envoy.clusters()  # its cluster stays until the route is ACKed
    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout_v1"}
    assert director.rollout_names() == ["checkout"]


# ---- never publish what Envoy must reject; NACKs blamed per virtual host -------------------------

SHOP = Placement(PLACEMENT.listener, ("shop.example.com",))


def _route_domains(cache: SnapshotCache) -> list[list[str]]:
    resource = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    any_message = any_pb2.Any.FromString(resource.any_bytes)
    config = route_pb2.RouteConfiguration()
    any_message.Unpack(config)
    return [list(vh.domains) for vh in config.virtual_hosts]


def test_a_duplicate_domain_is_never_published_and_the_newcomer_is_blocked() -> None:
    cache, _, director = _setup()
    director.set_rollout("r40", SHOP, TrafficPlan(V1, V2, 20))
    before = cache.snapshot_for("edge")
    director.set_rollout("r40b", Placement(PLACEMENT.listener, ("SHOP.example.com",)), TrafficPlan(V1))
    assert cache.snapshot_for("edge") is before  # the running snapshot stays
    assert _route_domains(cache) == [["*"], ["shop.example.com"]]
    reason = director.blocked("r40b")
    assert reason is not None and "'SHOP.example.com' is served twice" in reason and "r40" in reason
    assert director.blocked("r40") is None and director.blocked("checkout") is None

    director.set_desired_traffic("r40", TrafficPlan(V1, V2, 40))  # the others keep moving
    assert director.published_route("r40") == {"v1": 60, "v2": 40}
    assert cache.snapshot_for("edge") is not before

    director.remove_rollout("r40")  # once the host is free, the newcomer goes out
    assert director.blocked("r40b") is None
    assert _route_domains(cache) == [["*"], ["SHOP.example.com"]]


def test_a_blocked_rollout_is_never_reported_as_acked() -> None:
    _, _, director = _setup()
    acked: list[str] = []
    director.on_traffic_acked(lambda name, traffic: acked.append(name))
    director.set_rollout("other", Placement(PLACEMENT.listener, ("*",)), TrafficPlan(V1))  # "*" is taken
    assert director.blocked("other") is not None
    assert "other" not in acked and director.acked("other") is None


def test_a_host_moved_between_rollouts_in_one_batch_is_published_once() -> None:
    cache, _, director = _setup()
    director.set_rollout("a", SHOP, TrafficPlan(V1))
    generation = cache.generation
    with director.batch():
        director.set_rollout("a", Placement(PLACEMENT.listener, ("a.example.com",)), TrafficPlan(V1))
        director.set_rollout("b", SHOP, TrafficPlan(V2))
    assert director.blocked("a") is None and director.blocked("b") is None
    assert _route_domains(cache) == [["a.example.com"], ["shop.example.com"], ["*"]]
    assert cache.generation == generation + 1  # one publish, never the half-way state


def _two_on_one_route() -> tuple[SnapshotCache, ProxyStatus, TrafficDirector, FakeEnvoy]:
    cache, proxies, director = _setup()
    director.set_rollout("shop", SHOP, TrafficPlan(V1, V2, 20))
    envoy = FakeEnvoy(cache, proxies)
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)
    return cache, proxies, director, envoy


def test_a_route_nack_is_blamed_only_on_the_virtual_host_that_changed() -> None:
    cache, proxies, director, _ = _two_on_one_route()
    nacks: list[RolloutNack] = []
    director.on_nack(nacks.append)
    director.set_desired_traffic("shop", TrafficPlan(V1, V2, 40))
    route = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "v9", {ROUTE: route.version}, "bad virtual host", 0.0))
    assert [n.rollout for n in nacks] == ["shop"]  # checkout shares the route but did not change
    assert director.rejected("shop") == f"Envoy rejected route {ROUTE} (node envoy-1): bad virtual host"
    assert director.rejected("checkout") is None
    assert director.envoy_weights("shop") == {"v1": 80, "v2": 20}  # what Envoy still serves


def test_a_later_ack_of_that_type_supersedes_the_rejection() -> None:
    cache, proxies, director, envoy = _two_on_one_route()
    director.set_desired_traffic("shop", TrafficPlan(V1, V2, 40))
    route = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "v9", {ROUTE: route.version}, "bad", 0.0))
    envoy.ack(typeurls.CLUSTER)  # another type: still rejected
    assert director.rejected("shop") is not None
    director.set_desired_traffic("shop", TrafficPlan(V1))  # the rollback
    envoy.ack(typeurls.ROUTE)
    assert director.rejected("shop") is None
    assert director.envoy_weights("shop") == {"v1": 100}


def test_a_route_nack_with_an_unknown_accepted_version_blames_every_changed_host() -> None:
    cache, proxies, director = _setup()
    director.set_rollout("shop", SHOP, TrafficPlan(V1))
    FakeEnvoy(cache, proxies)  # never ACKed any route: everything in it is new to this proxy
    nacks: list[RolloutNack] = []
    director.on_nack(nacks.append)
    route = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "v9", {ROUTE: route.version}, "bad", 0.0))
    assert sorted(n.rollout for n in nacks) == ["checkout", "shop"]


def test_clusters_restored_under_legacy_names_stay_until_a_route_without_them_is_acked() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.expect_proxies({"envoy-1"}, grace=60)
    legacy = PublishedState((("checkout-v1", 80), ("checkout-v2", 20)), (("checkout-v1", V1), ("checkout-v2", V2)))
    director.restore_published("checkout", legacy)
    director.set_rollout("checkout", PLACEMENT, TrafficPlan(V1, V2, 20))
    routed = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE].references
    assert routed == {"checkout-v1", "checkout-v2"}  # what Envoy holds, until the new names are ACKed
    envoy = FakeEnvoy(cache, proxies)
    assert envoy.clusters() == {"checkout-v1", "checkout-v2", "checkout_v1", "checkout_v2"}
    envoy.ack(typeurls.CLUSTER)
    envoy.ack(typeurls.ENDPOINT)
    assert cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE].references == {"checkout_v1", "checkout_v2"}
    assert "checkout-v1" in envoy.clusters()  # the route naming them is not ACKed yet
    envoy.ack(typeurls.ROUTE)
    assert envoy.clusters() == {"checkout_v1", "checkout_v2"}


def test_published_state_is_reported_for_persistence() -> None:
    cache, proxies, director = _setup()
    seen: dict[str, PublishedState | None] = {}
    director.on_published(lambda name, state: seen.__setitem__(name, state))
    envoy = FakeEnvoy(cache, proxies)
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE):
        envoy.ack(type_url)
    director.set_desired_traffic("checkout", TrafficPlan(V2))
    envoy.ack(typeurls.CLUSTER)
    envoy.ack(typeurls.ENDPOINT)
    state = seen["checkout"]
    assert state is not None and state.route == (("checkout_v2", 100),)
    assert dict(state.clusters) == {"checkout_v1": V1, "checkout_v2": V2}  # v1 is retiring: remembered


def test_a_returning_proxy_is_back_only_once_it_asked_for_its_routes() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.expect_proxies({"envoy-1"}, grace=60)
    retiring = PublishedState((("checkout_v2", 100),), (("checkout_v1", V1), ("checkout_v2", V2)))
    director.restore_published("checkout", retiring)  # v1 retiring when the previous process died
    director.set_rollout("checkout", PLACEMENT, TrafficPlan(V2))
    proxies.apply(ProxyConnected(1, "envoy-1", "edge", "peer", 0.0))  # as Envoy: CDS first, routes later
    proxies.apply(SubscriptionChanged(1, typeurls.CLUSTER, True, frozenset()))
    snapshot = cache.snapshot_for("edge")
    clusters = snapshot.items(typeurls.CLUSTER)
    proxies.apply(ResourcesAcked(1, typeurls.CLUSTER, "v", {n: r.version for n, r in clusters.items()}, 0.0, 0.0))
    assert "checkout_v1" in cache.snapshot_for("edge").items(typeurls.CLUSTER)  # its old route may name v1
    proxies.apply(SubscriptionChanged(1, typeurls.ROUTE, False, frozenset({ROUTE})))
    assert "checkout_v1" in cache.snapshot_for("edge").items(typeurls.CLUSTER)  # not ACKed a route yet
    route = cache.snapshot_for("edge").items(typeurls.ROUTE)[ROUTE]
    proxies.apply(ResourcesAcked(1, typeurls.ROUTE, "v", {ROUTE: route.version}, 0.0, 0.0))
    assert set(cache.snapshot_for("edge").items(typeurls.CLUSTER)) == {"checkout_v2"}
