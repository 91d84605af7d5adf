"""Proxies kept in classes of equals (`ProxyStatus.classes()`), and the director's incremental ACK
bookkeeping built on them (`TrafficDirector.behind()`).

The director asks the gates once per class and, per event, looks up only the verdict of the class
the proxy moved to. These tests hold both against a full recount over every proxy, for random
sequences of connects, subscriptions, ACKs (current, stale, or of content no other proxy has),
NACKs, disconnects and weight changes, and check the safety rule they serve: a rollout's weight is
reported ACKed only once every serving proxy ACKed it.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.make_before_break import Acks, ServedProxy, gate_open, wait_for
from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    SubscriptionChanged,
)
from aviary.discovery.proxy_status import ProxyStatus, ProxyView
from aviary.discovery.resources import route_name
from aviary.discovery.sharing import selection, shared_sent
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
LISTENER = ListenerSpec(address="127.0.0.1", port=10000)
ROUTE = route_name(LISTENER)
TYPES = (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE)


def state_of(proxy: ProxyView) -> tuple[object, ...]:
    """What the gates read of a proxy, by value."""
    return (
        proxy.node_cluster,
        tuple(sorted((t, s.wildcard, s.names) for t, s in proxy.subscriptions.items())),
        tuple(sorted((t, getattr(a, "version", None), tuple(sorted(a.items()))) for t, a in proxy.acked.items())),
    )


def check_classes(proxies: ProxyStatus) -> None:
    """The classes partition the connected proxies, each holds equals, and their sizes are a recount."""
    classes = proxies.classes()
    members = [stream_id for kind in classes for stream_id in kind.members]
    assert sorted(members) == sorted(p.stream_id for p in proxies)  # every proxy in exactly one class
    assert all(len(kind) > 0 for kind in classes)
    for kind in classes:
        assert {state_of(p) for p in kind.members.values()} == {state_of(kind.sample)}
        assert all(proxies.class_of(stream_id) is kind for stream_id in kind.members)
    # Here every value is shared (`sharing`), so equals are never split over two classes either.
    recount = Counter(state_of(p) for p in proxies)
    assert sorted(len(kind) for kind in classes) == sorted(recount.values())


# ---- ProxyStatus alone ----------------------------------------------------------------------------

stream_ids = st.integers(1, 6)
name_sets = st.sampled_from([frozenset(), frozenset({"a"}), frozenset({"a", "b"}), frozenset({"b"})])
_X = {"a": "x"}  # one dict under two versions: what an ACK carries is named by version and content
acked_contents = st.sampled_from([("1", _X), ("5", _X), ("2", {"a": "y"}), ("3", {"a": "x", "b": "z"}), ("4", {})])
status_events = st.one_of(
    st.builds(lambda s, c: ProxyConnected(s, f"node-{s}", c, "peer", 0.0),
              stream_ids, st.sampled_from(["edge", "mesh"])),
    st.builds(lambda s, t, w, n: SubscriptionChanged(s, t, w, frozenset(n)),  # a fresh frozenset, as from a worker
              stream_ids, st.sampled_from(TYPES), st.booleans(), name_sets),
    # The same dict object (as the ACKs of one response in a worker's frame), or a copy of it.
    st.builds(lambda s, t, c, same: ResourcesAcked(s, t, c[0], c[1] if same else dict(c[1]), 0.0, 0.0),
              stream_ids, st.sampled_from(TYPES), acked_contents, st.booleans()),
    st.builds(lambda s, t: ResourcesNacked(s, t, "9", {"a": "bad"}, "no", 0.0), stream_ids, st.sampled_from(TYPES)),
    st.builds(ProxyDisconnected, stream_ids),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(status_events, max_size=40))
def test_classes_are_a_recount_of_equal_proxies_after_every_event(events: list[ProxyEvent]) -> None:
    proxies = ProxyStatus()
    for event in events:
        proxies.apply(event)
        check_classes(proxies)
        if isinstance(event, ResourcesAcked) and (proxy := proxies.get(event.stream_id)) is not None:
            acked = proxy.acked[event.type_url]
            assert dict(acked) == dict(event.resources) and getattr(acked, "version", None) == event.version


def test_proxies_that_acked_the_same_share_one_class_and_leave_it_one_by_one() -> None:
    proxies = ProxyStatus()
    for stream_id in (1, 2, 3):
        proxies.apply(ProxyConnected(stream_id, f"envoy-{stream_id}", "edge", "peer", 0.0))
        proxies.apply(SubscriptionChanged(stream_id, typeurls.ROUTE, False, frozenset({ROUTE})))
        proxies.apply(ResourcesAcked(stream_id, typeurls.ROUTE, "r1", {ROUTE: "a"}, 0.0, 0.0))
    (only,) = proxies.classes()
    assert len(only) == 3
    proxies.apply(ResourcesAcked(2, typeurls.ROUTE, "r2", {ROUTE: "b"}, 0.0, 0.0))
    assert sorted(len(kind) for kind in proxies.classes()) == [1, 2]
    proxies.apply(ProxyDisconnected(1))
    proxies.apply(ProxyDisconnected(3))
    (left,) = proxies.classes()
    assert list(left.members) == [2] and left.sample.stream_id == 2


def test_one_dict_acked_under_two_versions_is_recorded_under_each() -> None:
    proxies = ProxyStatus()
    carried = {ROUTE: "a"}  # a worker's frame hands every ACK of one response the same dict
    for stream_id, version in ((1, "r1"), (2, "r1"), (3, "r9")):
        proxies.apply(ProxyConnected(stream_id, f"envoy-{stream_id}", "edge", "peer", 0.0))
        proxies.apply(ResourcesAcked(stream_id, typeurls.ROUTE, version, carried, 0.0, 0.0))
    versions = {p.stream_id: getattr(p.acked[typeurls.ROUTE], "version", None) for p in proxies}
    assert versions == {1: "r1", 2: "r1", 3: "r9"}
    check_classes(proxies)


def test_a_move_to_a_class_that_emptied_since_makes_a_new_class() -> None:
    proxies = ProxyStatus()
    old, new = shared_sent(typeurls.ROUTE, "r1", {ROUTE: "a"}), shared_sent(typeurls.ROUTE, "r2", {ROUTE: "b"})
    other = shared_sent(typeurls.ROUTE, "r3", {ROUTE: "c"})
    for stream_id in (1, 2):
        proxies.apply(ProxyConnected(stream_id, f"envoy-{stream_id}", "edge", "peer", 0.0))
        proxies.apply(ResourcesAcked(stream_id, typeurls.ROUTE, "r1", old, 0.0, 0.0))
    proxies.apply(ResourcesAcked(1, typeurls.ROUTE, "r2", new, 0.0, 0.0))  # the first to move: remembered
    proxies.apply(ResourcesAcked(1, typeurls.ROUTE, "r3", other, 0.0, 0.0))  # the class it moved to empties
    proxies.apply(ResourcesAcked(2, typeurls.ROUTE, "r2", new, 0.0, 0.0))  # the same move, to a class made anew
    check_classes(proxies)
    assert sorted(len(kind) for kind in proxies.classes()) == [1, 1]


# ---- the director's bookkeeping -------------------------------------------------------------------


class Fleet:
    """Envoy-like proxies on one listener, driven by a test: each ACKs what it is served when told."""

    def __init__(self) -> None:
        self.cache, self.proxies = SnapshotCache(), ProxyStatus()
        self.director = TrafficDirector(self.cache, self.proxies)
        self.acked: list[tuple[str, TrafficPlan]] = []
        self.director.on_traffic_acked(lambda name, plan: self.acked.append((name, plan)))
        for name in ("shop", "cart"):
            self.director.set_rollout(name, Placement(LISTENER, (f"{name}.example.com",)), TrafficPlan(V1, V2, 10))

    def connect(self, stream_id: int, cluster: str) -> None:
        self.proxies.apply(ProxyConnected(stream_id, f"envoy-{stream_id}", cluster, "peer", 0.0))
        self.proxies.apply(SubscriptionChanged(stream_id, typeurls.CLUSTER, True, frozenset()))
        self.proxies.apply(SubscriptionChanged(stream_id, typeurls.LISTENER, True, frozenset()))
        self.proxies.apply(SubscriptionChanged(stream_id, typeurls.ROUTE, False, frozenset({ROUTE})))

    def ack(self, stream_id: int, type_url: str) -> None:
        """ACK what the proxy is served now (EDS: after subscribing to every published cluster)."""
        proxy = self.proxies.get(stream_id)
        if proxy is None:
            return
        snapshot = self.cache.snapshot_for(proxy.node_cluster)
        if type_url == typeurls.ENDPOINT:
            names = frozenset(snapshot.items(typeurls.CLUSTER))
            self.proxies.apply(SubscriptionChanged(stream_id, type_url, False, names))
        subscription = proxy.subscription(type_url)
        sent = selection(snapshot, type_url, subscription.names, subscription.wildcard).sent
        self.proxies.apply(ResourcesAcked(stream_id, type_url, sent.version, sent, 0.0, 0.0))

    def check(self) -> None:
        """`behind()` and the gates as a recount over every proxy would have them."""
        director = self.director
        check_classes(self.proxies)
        if director._unsettled:
            assert director.behind() == {p.stream_id for p in self.proxies if director._holds_up(p)}
        every = Acks(tuple(director._served(p) for p in self.proxies))
        by_class = director._acks()
        assert all(isinstance(p, ServedProxy) for p in by_class.proxies)
        assert len(by_class.proxies) == len(self.proxies.classes()) <= len(every.proxies)
        for name, published in director._published.items():
            placement = director._placements[name]
            wait = wait_for(name, published, director.desired(name), placement)
            assert gate_open(placement, wait, by_class) == gate_open(placement, wait, every)


fleet_steps = st.one_of(
    st.tuples(st.just("connect"), st.integers(1, 5), st.sampled_from(["edge", "mesh"])),
    st.tuples(st.just("ack"), st.integers(1, 5), st.sampled_from(TYPES)),
    st.tuples(st.just("nack"), st.integers(1, 5), st.sampled_from(TYPES)),
    st.tuples(st.just("leave"), st.integers(1, 5), st.just("")),
    st.tuples(st.just("weight"), st.sampled_from(["shop", "cart"]), st.integers(0, 100)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(fleet_steps, max_size=50))
def test_incremental_bookkeeping_equals_a_full_recount(steps: list[tuple[str, object, object]]) -> None:
    fleet = Fleet()
    for action, who, what in steps:
        if action == "connect":
            assert isinstance(who, int) and isinstance(what, str)
            fleet.connect(who, what)
        elif action == "ack":
            assert isinstance(who, int) and isinstance(what, str)
            fleet.ack(who, what)
        elif action == "nack":
            assert isinstance(who, int) and isinstance(what, str)
            fleet.proxies.apply(ResourcesNacked(who, what, "bad", {}, "rejected", 0.0))
        elif action == "leave":
            assert isinstance(who, int)
            fleet.proxies.apply(ProxyDisconnected(who))
        else:
            assert isinstance(who, str) and isinstance(what, int)
            fleet.director.set_canary_weight(who, what)
        fleet.check()


def test_a_weight_is_acked_only_once_every_proxy_of_a_class_acked_it() -> None:
    fleet = Fleet()
    for stream_id in range(1, 6):
        fleet.connect(stream_id, "edge")
        for type_url in TYPES:
            fleet.ack(stream_id, type_url)
    assert len(fleet.proxies.classes()) == 1
    fleet.acked.clear()
    fleet.director.set_canary_weight("shop", 40)
    assert fleet.director.behind() == {1, 2, 3, 4, 5}
    for stream_id in range(1, 5):
        fleet.ack(stream_id, typeurls.ROUTE)
        assert fleet.acked == []  # four of five ACKed: the class of the fifth still holds it up
        fleet.check()
    assert fleet.director.behind() == {5}
    fleet.ack(5, typeurls.ROUTE)
    assert fleet.acked == [("shop", TrafficPlan(V1, V2, 40))]
    assert fleet.director.behind() == frozenset()


def test_after_a_restart_returning_proxies_are_struck_off_one_by_one_without_a_pass_each() -> None:
    fleet = Fleet()
    director = fleet.director
    director.expect_proxies({f"envoy-{i}" for i in range(1, 51)}, grace=600)
    passes = 0
    reconcile = director.reconcile

    def counted() -> None:
        nonlocal passes
        passes += 1
        reconcile()

    director.reconcile = counted  # type: ignore[method-assign]
    director.set_canary_weight("shop", 30)  # decided while the proxies are away: waits for them
    assert director.published_route("shop") == {"v1": 90, "v2": 10}
    for stream_id in range(1, 51):
        fleet.connect(stream_id, "edge")
        for type_url in TYPES:
            fleet.ack(stream_id, type_url)
        if stream_id < 50:
            assert director.awaited_proxies() == {f"envoy-{i}" for i in range(stream_id + 1, 51)}
            assert director.published_route("shop") == {"v1": 90, "v2": 10}  # every gate closed
    assert director.awaited_proxies() == frozenset()
    assert director.published_route("shop") == {"v1": 70, "v2": 30}  # moved once the last one was back
    assert passes <= 5  # not a pass per returning proxy's event (there were 50 x 8)
    # The last one came back with its CDS ACK and then ACKed the moved route too; the others are behind.
    assert director.behind() == set(range(1, 50))
    fleet.check()
