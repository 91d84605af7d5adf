"""Streams sent the same thing share what they hold of it (`aviary.discovery.sharing`).

The protocol rules themselves are tested in test_ads_protocol.py; here, who holds which object.
"""

from __future__ import annotations

import gc
import pickle

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_events import ProxyEvent, ResourcesAcked, ResourcesNacked
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.sharing import Sent, shared_names, shared_sent
from aviary.discovery.sotw import SotwStream
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
V3 = Backend("v3", (Endpoint.model_validate("127.0.0.1:9003"),))
LISTENER = ListenerSpec(address="127.0.0.1", port=10000)


class Proxy:
    """One SotwStream fed like an Envoy: requests in, every response ACKed."""

    def __init__(self, stream_id: int, cache: SnapshotCache, proxies: ProxyStatus) -> None:
        self.events: list[ProxyEvent] = []

        def emit(event: ProxyEvent) -> None:
            self.events.append(event)
            proxies.apply(event)

        self.stream = SotwStream(stream_id, f"peer-{stream_id}", cache, emit)
        self.node = base_pb2.Node(id=f"node-{stream_id}", cluster="edge")
        self.nonces: dict[str, str] = {}

    def ask(self, type_url: str, names: list[str] | None = None) -> list[discovery_pb2.DiscoveryResponse]:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names or [], response_nonce=self.nonces.get(type_url, ""), node=self.node
        )
        responses = [discovery_pb2.DiscoveryResponse.FromString(r) for r in self.stream.on_request(request)]
        for response in responses:
            self.nonces[response.type_url] = response.nonce
        return responses

    def acked(self, type_url: str) -> ResourcesAcked:
        return [e for e in self.events if isinstance(e, ResourcesAcked) and e.type_url == type_url][-1]


def plane() -> tuple[SnapshotCache, ProxyStatus, TrafficDirector]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.set_rollout("checkout", Placement(LISTENER, ("*",)), TrafficPlan(V1, V2, 10))
    return cache, proxies, director


def test_streams_sent_the_same_share_what_they_hold() -> None:
    cache, proxies, _ = plane()
    a, b = Proxy(1, cache, proxies), Proxy(2, cache, proxies)
    for proxy in (a, b):
        assert len(proxy.ask(typeurls.CLUSTER)) == 1
        proxy.ask(typeurls.CLUSTER)  # the ACK
        proxy.ask(typeurls.ENDPOINT, ["checkout_v1", "checkout_v2"])
        proxy.ask(typeurls.ENDPOINT, ["checkout_v2", "checkout_v1"])  # the ACK, names in another order
    for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT):
        assert a.acked(type_url).resources is b.acked(type_url).resources
        view_a, view_b = proxies.get(1), proxies.get(2)
        assert view_a is not None and view_b is not None
        assert view_a.acked[type_url] is view_b.acked[type_url]  # ProxyStatus keeps the shared value
    assert view_a.subscriptions[typeurls.ENDPOINT].names is view_b.subscriptions[typeurls.ENDPOINT].names
    assert dict(a.acked(typeurls.CLUSTER).resources) == {
        name: r.version for name, r in cache.snapshot_for("edge").items(typeurls.CLUSTER).items()
    }


def test_a_stream_subscribing_to_other_names_shares_nothing_of_that_type() -> None:
    cache, proxies, _ = plane()
    a, b = Proxy(1, cache, proxies), Proxy(2, cache, proxies)
    a.ask(typeurls.ENDPOINT, ["checkout_v1", "checkout_v2"])
    a.ask(typeurls.ENDPOINT, ["checkout_v1", "checkout_v2"])
    b.ask(typeurls.ENDPOINT, ["checkout_v1"])
    b.ask(typeurls.ENDPOINT, ["checkout_v1"])
    assert a.acked(typeurls.ENDPOINT).resources is not b.acked(typeurls.ENDPOINT).resources
    assert set(a.acked(typeurls.ENDPOINT).resources) == {"checkout_v1", "checkout_v2"}
    assert set(b.acked(typeurls.ENDPOINT).resources) == {"checkout_v1"}
    view_a, view_b = proxies.get(1), proxies.get(2)
    assert view_a is not None and view_b is not None
    assert view_a.subscriptions[typeurls.ENDPOINT].names != view_b.subscriptions[typeurls.ENDPOINT].names


def test_responses_are_those_of_a_stream_that_shares_nothing() -> None:
    """Each stream still gets its own nonces; the rest of the response is the same bytes."""
    cache, proxies, director = plane()
    a, b = Proxy(1, cache, proxies), Proxy(2, cache, proxies)
    a.ask(typeurls.CLUSTER)
    (first_b,) = b.ask(typeurls.CLUSTER)
    (second_b,) = b.ask(typeurls.LISTENER)
    assert a.ask(typeurls.CLUSTER) == []  # a's ACK: nothing new for it
    (lds_a,) = a.ask(typeurls.LISTENER)
    assert (first_b.nonce, second_b.nonce) == ("1", "2")
    assert lds_a.nonce == "2" and lds_a.version_info == second_b.version_info
    assert lds_a.resources == second_b.resources
    director.set_canary_weight("checkout", 50)  # only route configurations change
    assert a.stream.on_snapshot_changed() == [] and b.stream.on_snapshot_changed() == []


def test_a_nack_holds_the_rejected_set_until_different_content() -> None:
    cache, proxies, director = plane()
    a = Proxy(1, cache, proxies)
    a.ask(typeurls.CLUSTER)
    a.ask(typeurls.CLUSTER)
    director.set_desired_traffic("checkout", TrafficPlan(V1, V3, 0))
    (update,) = a.stream.on_snapshot_changed()
    rejected = discovery_pb2.DiscoveryResponse.FromString(update)
    nack = discovery_pb2.DiscoveryRequest(
        type_url=typeurls.CLUSTER, response_nonce=rejected.nonce, error_detail={"message": "no"}
    )
    assert a.stream.on_request(nack) == []
    (event,) = [e for e in a.events if isinstance(e, ResourcesNacked)]
    assert event.version == rejected.version_info and "checkout_v3" in event.resources
    assert a.stream.on_snapshot_changed() == []  # the rejected set is not sent again


def test_shared_values_die_with_their_last_holder() -> None:
    names = shared_names(frozenset({"x-only-here", "y-only-here"}))
    assert shared_names(frozenset({"y-only-here", "x-only-here"})) is names
    sent = shared_sent("t-only-here", "v-only-here", {"x": "1"})
    assert shared_sent("t-only-here", "v-only-here", {"x": "1"}) is sent
    del names, sent
    gc.collect()
    assert shared_sent("t-only-here", "v-only-here", {"x": "2"}) == {"x": "2"}  # nothing left to confuse it with


def test_a_made_up_version_never_gets_another_content() -> None:
    first = shared_sent(typeurls.ROUTE, "v", {"route": "a"})
    other = shared_sent(typeurls.ROUTE, "v", {"route": "b"})
    assert first == {"route": "a"} and other == {"route": "b"}
    assert shared_sent(typeurls.ROUTE, "v", {"route": "a"}) is first


def test_sent_crosses_a_pipe_into_the_receivers_shared_value() -> None:
    sent = shared_sent(typeurls.CLUSTER, "v-pickled", {"c": "1"})
    copy = pickle.loads(pickle.dumps(sent))
    assert copy is sent  # the same process here: the interned one
    assert isinstance(copy, Sent) and copy.version == "v-pickled" and copy.get("c") == "1" and copy.get("d") is None
