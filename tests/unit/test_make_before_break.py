"""The pure make-before-break core (`discovery/make_before_break.py`), driven with plain values.

No director, no cache, no event plumbing: a test publishes `advance`'s result with
`resources.build_snapshot`, makes a proxy ACK what it is sent, and calls `advance` again, which
is all the director's shell does around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.gates import cluster_acked
from aviary.discovery.make_before_break import (
    NOTHING,
    Acks,
    Placement,
    Published,
    Routing,
    ServedProxy,
    Stage,
    Wait,
    advance,
    holds_rollout_up,
    holds_up,
    routing_of,
    served_hosts_and_route,
)
from aviary.discovery.proxy_status import ProxyStatus, ProxyView, Subscription
from aviary.discovery.resources import PublishedRollout, build_snapshot, route_name
from aviary.discovery.snapshot import Snapshot
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan

LISTENER = ListenerSpec(address="127.0.0.1", port=10000)
ROUTE = route_name(LISTENER)
PLACEMENT = Placement(LISTENER, ("*",))
PLACEMENTS = {"shop": PLACEMENT}


def backend(version: str) -> Backend:
    return Backend(version, (Endpoint.model_validate(f"127.0.0.1:{9000 + len(version)}"),))


V1, V2, V3 = backend("v1"), backend("v2"), backend("v3")


def snapshot_of(published: Mapping[str, Published], placements: Mapping[str, Placement] = PLACEMENTS) -> Snapshot:
    """What the shell publishes (a rollout being removed keeps its last route while a newcomer warms up)."""
    rollouts = []
    for name, state in published.items():
        hosts, route = served_hosts_and_route(name, published, placements)
        rollouts.append(PublishedRollout(name, placements[name].listener, hosts, route,
                                         tuple(sorted(state.clusters.items())), state.cohorts, state.stickiness,
                                         state.mirror))
    return build_snapshot(rollouts)


@dataclass
class Proxy:
    """An Envoy-like proxy: wildcard CDS, EDS for every cluster, RDS for the listener's route."""

    view: ProxyView = field(default_factory=lambda: ProxyView(1, "envoy-1", "edge", "peer", 0.0))

    def __post_init__(self) -> None:
        self.view.subscriptions[typeurls.CLUSTER] = Subscription(wildcard=True)
        self.view.subscriptions[typeurls.ROUTE] = Subscription(names=frozenset({ROUTE}))

    def ack(self, snapshot: Snapshot, *type_urls: str) -> None:
        for type_url in type_urls:
            if type_url == typeurls.ENDPOINT:
                self.view.subscriptions[type_url] = Subscription(names=frozenset(snapshot.items(typeurls.CLUSTER)))
            subscription = self.view.subscription(type_url)
            chosen = snapshot.select(type_url, subscription.names, subscription.wildcard)
            self.view.acked[type_url] = MappingProxyType({n: r.version for n, r in chosen.items()})

    def ack_all(self, snapshot: Snapshot) -> None:
        self.ack(snapshot, typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE)

    def served(self, snapshot: Snapshot) -> Acks:
        return Acks((ServedProxy(self.view, "", snapshot),))


def settle(published: dict[str, Published], desired: Mapping[str, TrafficPlan], proxy: Proxy | None = None,
           placements: Mapping[str, Placement] = PLACEMENTS,
           kept: dict[str, Stage] | None = None) -> dict[str, Stage]:
    """The shell's loop: advance, publish, again until nothing moves (the proxy ACKs nothing).
    `kept`: the stages of the previous call, updated in place (as the director keeps them)."""
    stages = dict(kept or {})
    for _ in range(8):
        snapshot = snapshot_of(published, placements)
        acks = proxy.served(snapshot) if proxy is not None else Acks()
        advanced = advance(published, desired, placements, acks, stages)
        stages = dict(advanced.stages)
        changed = dict(advanced.published) != published
        published.clear()
        published.update(advanced.published)
        if not changed:
            break
    if kept is not None:
        kept.clear()
        kept.update(stages)
    return stages


def test_without_proxies_a_switch_completes_in_one_pass() -> None:
    start = {"shop": Published(routing_of("shop", TrafficPlan(V1)), {"shop_v1": V1})}
    advanced = advance(start, {"shop": TrafficPlan(V2)}, PLACEMENTS, Acks())
    assert advanced.published["shop"] == Published(routing_of("shop", TrafficPlan(V2)), {"shop_v2": V2})
    assert advanced.stages == {"shop": Stage.SETTLED}
    assert start["shop"].clusters == {"shop_v1": V1}  # inputs are values: untouched


def test_a_switch_goes_adding_then_retiring_then_settled() -> None:
    published = {"shop": Published(routing_of("shop", TrafficPlan(V1)), {"shop_v1": V1})}
    envoy = Proxy()
    envoy.ack_all(snapshot_of(published))
    desired = {"shop": TrafficPlan(V2)}

    stages = settle(published, desired, envoy)
    assert stages == {"shop": Stage.ADDING}
    assert published["shop"].route == (("shop_v1", 100),) and set(published["shop"].clusters) == {"shop_v1", "shop_v2"}

    envoy.ack(snapshot_of(published), typeurls.CLUSTER)
    assert settle(published, desired, envoy) == {"shop": Stage.ADDING}  # no EDS yet
    envoy.ack(snapshot_of(published), typeurls.ENDPOINT)
    stages = settle(published, desired, envoy)
    assert stages == {"shop": Stage.RETIRING}
    assert published["shop"].route == (("shop_v2", 100),) and "shop_v1" in published["shop"].clusters

    envoy.ack(snapshot_of(published), typeurls.ROUTE)
    assert settle(published, desired, envoy) == {"shop": Stage.SETTLED}
    assert set(published["shop"].clusters) == {"shop_v2"}


def test_a_weight_change_is_shifting_until_the_route_is_acked() -> None:
    at_30 = TrafficPlan(V1, V2, 30)
    published = {"shop": Published(routing_of("shop", at_30), {"shop_v1": V1, "shop_v2": V2})}
    envoy = Proxy()
    envoy.ack_all(snapshot_of(published))
    assert settle(published, {"shop": at_30}, envoy) == {"shop": Stage.SETTLED}
    desired = {"shop": TrafficPlan(V1, V2, 60)}
    assert settle(published, desired, envoy) == {"shop": Stage.SHIFTING}
    envoy.ack(snapshot_of(published), typeurls.ROUTE)
    assert settle(published, desired, envoy) == {"shop": Stage.SETTLED}


def test_a_settled_rollout_stays_settled_while_a_neighbour_shifts() -> None:
    placements = {"shop": PLACEMENT, "other": Placement(LISTENER, ("other.example.com",))}
    desired = {"shop": TrafficPlan(V1, V2, 30), "other": TrafficPlan(V3)}
    published: dict[str, Published] = {}
    kept: dict[str, Stage] = {}
    envoy = Proxy()
    settle(published, desired, envoy, placements, kept)
    for _ in range(3):
        envoy.ack_all(snapshot_of(published, placements))
        stages = settle(published, desired, envoy, placements, kept)
    assert stages == {"shop": Stage.SETTLED, "other": Stage.SETTLED}
    desired["shop"] = TrafficPlan(V1, V2, 60)  # a new version of the shared route configuration
    assert settle(published, desired, envoy, placements, kept) == {"shop": Stage.SHIFTING, "other": Stage.SETTLED}
    envoy.ack(snapshot_of(published, placements), typeurls.ROUTE)
    assert settle(published, desired, envoy, placements, kept) == {"shop": Stage.SETTLED, "other": Stage.SETTLED}


def test_the_director_shows_each_rollouts_stage() -> None:
    director = TrafficDirector(SnapshotCache(), ProxyStatus())
    director.set_rollout("shop", PLACEMENT, TrafficPlan(V1, V2, 30))
    assert director.stage("shop") is Stage.SETTLED  # no proxy: every gate open
    assert director.stage("nope") is None


def test_removal_is_route_first_then_clusters() -> None:
    placements = {"shop": PLACEMENT, "other": Placement(LISTENER, ("other.example.com",))}
    other = Published(routing_of("other", TrafficPlan(V3)), {"other_v3": V3})
    live = {"shop": Published(routing_of("shop", TrafficPlan(V1)), {"shop_v1": V1}), "other": other}
    envoy = Proxy()
    envoy.ack_all(snapshot_of(live, placements))
    removing = {"shop": replace(live["shop"], routing=NOTHING, handover=live["shop"].route, removing=True),
                "other": other}
    desired = {"other": TrafficPlan(V3)}
    snapshot = snapshot_of(removing, placements)
    assert snapshot.items(typeurls.ROUTE)[ROUTE].references == {"other_v3"}  # the virtual host goes first
    advanced = advance(removing, desired, placements, envoy.served(snapshot))
    assert advanced.removed == frozenset() and advanced.stages["shop"] is Stage.REMOVING
    envoy.ack(snapshot, typeurls.ROUTE)
    advanced = advance(removing, desired, placements, envoy.served(snapshot))
    assert advanced.removed == {"shop"} and set(advanced.published) == {"other"}


def test_while_proxies_are_awaited_after_a_restart_nothing_moves() -> None:
    start = {"shop": Published(routing_of("shop", TrafficPlan(V1)), {"shop_v1": V1})}
    advanced = advance(start, {"shop": TrafficPlan(V2)}, PLACEMENTS, Acks(awaiting=True))
    assert advanced.published["shop"].routing == start["shop"].routing
    assert advanced.stages == {"shop": Stage.ADDING}


def test_the_predicate_names_only_proxies_that_hold_the_rollout_up() -> None:
    published = Published(routing_of("shop", TrafficPlan(V1, V2, 30)), {"shop_v1": V1, "shop_v2": V2})
    snapshot = snapshot_of({"shop": published})
    acked, behind, elsewhere = Proxy(), Proxy(), Proxy()
    acked.ack_all(snapshot)
    behind.ack(snapshot, typeurls.CLUSTER, typeurls.ENDPOINT)  # route not ACKed yet
    elsewhere.ack_all(snapshot)
    plan = TrafficPlan(V1, V2, 30)
    assert not holds_rollout_up(ServedProxy(acked.view, "", snapshot), "shop", published, plan, PLACEMENT)
    assert holds_rollout_up(ServedProxy(behind.view, "", snapshot), "shop", published, plan, PLACEMENT)
    # A proxy of another group does not receive a rollout placed on group "edge".
    placed = Placement(LISTENER, ("*",), proxy_cluster="edge")
    assert not holds_rollout_up(ServedProxy(behind.view, "other", snapshot), "shop", published, plan, placed)
    # A proxy that does not subscribe to the route (a gRPC client of another rollout) is not waited for.
    behind.view.subscriptions[typeurls.ROUTE] = Subscription(names=frozenset({"grpc-other"}))
    assert not holds_up(ServedProxy(behind.view, "", snapshot), Wait(routes=(ROUTE,)))


def test_a_newcomer_taking_a_host_over_waits_without_a_virtual_host() -> None:
    placements = {"old": PLACEMENT, "new": PLACEMENT}
    published = {"old": Published(NOTHING, {"old_v1": V1}, handover=(("old_v1", 100),), removing=True)}
    envoy = Proxy()
    before = snapshot_of({"old": Published(Routing(published["old"].handover), {"old_v1": V1})}, placements)
    envoy.ack_all(before)  # what was published before the rename, ACKed
    advanced = advance(published, {"new": TrafficPlan(V2)}, placements, envoy.served(before))
    published = dict(advanced.published)
    assert published["new"].routing == NOTHING  # no virtual host until its cluster is ACKed
    assert advanced.stages == {"old": Stage.REMOVING, "new": Stage.ADDING}
    assert settle(published, {"new": TrafficPlan(V2)}, envoy, placements) == {"old": Stage.REMOVING,
                                                                              "new": Stage.ADDING}
    assert snapshot_of(published, placements).items(typeurls.ROUTE)[ROUTE].references == {"old_v1"}  # old serves
    envoy.ack(snapshot_of(published, placements), typeurls.CLUSTER, typeurls.ENDPOINT)
    settle(published, {"new": TrafficPlan(V2)}, envoy, placements)
    assert published["new"].route == (("new_v2", 100),)  # the host handed over in one route update
    assert snapshot_of(published, placements).items(typeurls.ROUTE)[ROUTE].references == {"new_v2"}


weights = st.integers(0, 100)
plans = st.builds(lambda v, w: TrafficPlan(V1, v, w) if v is not None else TrafficPlan(V1),
                  st.sampled_from([None, V2, V3]), weights)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(plans, st.lists(st.sampled_from(["cds", "eds", "rds", "pass"]), max_size=6)),
                min_size=1, max_size=6))
def test_every_route_published_names_only_clusters_the_proxy_has(
        steps: list[tuple[TrafficPlan, list[str]]]) -> None:
    """Whatever the plans and the order in which the proxy ACKs: a route moves only onto clusters
    the proxy ACKed (with endpoints), and a cluster leaves only once the route the proxy ACKed no
    longer names it."""
    published = {"shop": Published(routing_of("shop", TrafficPlan(V1)), {"shop_v1": V1})}
    envoy = Proxy()
    envoy.ack_all(snapshot_of(published))
    types = {"cds": typeurls.CLUSTER, "eds": typeurls.ENDPOINT, "rds": typeurls.ROUTE}
    for plan, acks in steps:
        desired = {"shop": plan}
        for action in [*acks, "pass"]:
            if action in types:
                envoy.ack(snapshot_of(published), types[action])
                continue
            before, snapshot = published["shop"], snapshot_of(published)
            advanced = advance(published, desired, PLACEMENTS, envoy.served(snapshot))
            after = advanced.published["shop"]
            named = {c for c, _ in after.route}
            assert named <= set(after.clusters)
            if after.routing != before.routing:
                assert all(cluster_acked(envoy.view, snapshot, cluster) for cluster in named), named
            route = snapshot.items(typeurls.ROUTE)[ROUTE]
            for cluster in set(before.clusters) - set(after.clusters):
                assert envoy.view.acked_version_of(typeurls.ROUTE, ROUTE) == route.version, cluster
                assert cluster not in route.references, cluster
            published = dict(advanced.published)
    # Given every ACK, it settles as planned.
    for _ in range(3):
        envoy.ack_all(snapshot_of(published))
        settle(published, {"shop": steps[-1][0]}, envoy)
    assert published["shop"].routing == routing_of("shop", steps[-1][0])
    assert set(published["shop"].clusters) == {c for c, _ in published["shop"].route}
