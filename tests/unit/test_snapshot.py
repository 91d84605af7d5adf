"""Snapshots, hand-assembled wire format and resource builders, without sockets."""

from __future__ import annotations

from dataclasses import replace

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls, wire
from aviary.discovery.resources import PublishedRollout, build_snapshot, cluster_name, render, violations
from aviary.discovery.snapshot import Resource, Snapshot
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("10.0.0.2:9002"), Endpoint.model_validate("10.0.0.3:9002")))
DNS = Backend("v3", (Endpoint.model_validate("backend.internal:8080"),))
LISTENER = ListenerSpec(address="0.0.0.0", port=10000)


def _rollout(name: str = "checkout", hosts: tuple[str, ...] = ("*",), **kw: object) -> PublishedRollout:
    route = kw.get("route", ((V1, 90), (V2, 10)))
    clusters = kw.get("clusters", (V1, V2))
    return PublishedRollout.of(name, LISTENER, hosts, route, clusters)  # type: ignore[arg-type]


def test_wire_response_decodes_with_the_real_classes() -> None:
    snapshot = build_snapshot([_rollout()])
    items = snapshot.items(typeurls.CLUSTER)
    data = wire.discovery_response("v7", typeurls.CLUSTER, "42", (items[n].entry for n in sorted(items)))
    response = discovery_pb2.DiscoveryResponse.FromString(data)
    assert (response.version_info, response.type_url, response.nonce) == ("v7", typeurls.CLUSTER, "42")
    names = []
    for packed in response.resources:
        cluster = cluster_pb2.Cluster()
        assert packed.Unpack(cluster)
        names.append(cluster.name)
    assert names == ["checkout_v1", "checkout_v2"]


def test_large_varints_round_trip() -> None:
    payload = b"x" * 70_000  # length needs a 3-byte varint
    resource = wire.length_delimited(2, payload)
    any_msg = discovery_pb2.DiscoveryResponse.FromString(
        wire.discovery_response("1", "t", "n", [wire.resources_entry(wire.encode_any("t", payload))])
    )
    assert any_msg.resources[0].value == payload
    assert resource.endswith(payload)


def test_weighted_route_and_virtual_hosts() -> None:
    snapshot = build_snapshot([_rollout(), _rollout("payments", ("pay.example.com",), route=((V1, 100),),
                                                     clusters=(V1,))])
    route = route_pb2.RouteConfiguration()
    assert snapshot.items(typeurls.ROUTE)["route-0.0.0.0-10000"].references == {
        "checkout_v1", "checkout_v2", "payments_v1"
    }
    packed = discovery_pb2.DiscoveryResponse.FromString(
        wire.discovery_response("1", typeurls.ROUTE, "1", [snapshot.items(typeurls.ROUTE)["route-0.0.0.0-10000"].entry])
    ).resources[0]
    packed.Unpack(route)
    hosts = {vh.name: list(vh.domains) for vh in route.virtual_hosts}
    assert hosts == {"checkout": ["*"], "payments": ["pay.example.com"]}
    weights = {c.name: c.weight.value for c in route.virtual_hosts[0].routes[0].route.weighted_clusters.clusters}
    assert weights == {"checkout_v1": 90, "checkout_v2": 10}


def _unpack(resource: Resource, message_type: type) -> object:
    message = message_type()
    response = discovery_pb2.DiscoveryResponse.FromString(
        wire.discovery_response("1", resource.type_url, "1", [resource.entry])
    )
    response.resources[0].Unpack(message)
    return message


def test_load_assignment_always_has_locality_and_weight() -> None:
    snapshot = build_snapshot([_rollout()])
    cla = _unpack(snapshot.items(typeurls.ENDPOINT)["checkout_v2"], endpoint_pb2.ClusterLoadAssignment)
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    (locality,) = cla.endpoints
    assert locality.HasField("locality")
    assert locality.load_balancing_weight.value == 1
    assert [e.endpoint.address.socket_address.address for e in locality.lb_endpoints] == ["10.0.0.2", "10.0.0.3"]


def test_dns_endpoints_make_a_strict_dns_cluster_without_eds() -> None:
    snapshot = build_snapshot([_rollout(route=((DNS, 100),), clusters=(DNS,))])
    cluster = _unpack(snapshot.items(typeurls.CLUSTER)["checkout_v3"], cluster_pb2.Cluster)
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.DiscoveryType.STRICT_DNS
    assert "checkout_v3" not in snapshot.items(typeurls.ENDPOINT)


def test_api_listener_is_only_for_named_subscriptions() -> None:
    snapshot = build_snapshot([_rollout()])
    wildcard = snapshot.select(typeurls.LISTENER, (), wildcard=True)
    assert list(wildcard) == ["listener-0.0.0.0-10000"]
    named = snapshot.select(typeurls.LISTENER, ["checkout"], wildcard=False)
    listener = _unpack(named["checkout"], listener_pb2.Listener)
    assert isinstance(listener, listener_pb2.Listener)
    assert listener.HasField("api_listener")


def test_versions_follow_content_and_survive_rebuilds() -> None:
    first, again = build_snapshot([_rollout()]), build_snapshot([_rollout()])
    assert first.equivalent(again)
    moved = build_snapshot([_rollout(route=((V1, 80), (V2, 20)))])
    assert moved.items(typeurls.ROUTE)["route-0.0.0.0-10000"].version != \
        first.items(typeurls.ROUTE)["route-0.0.0.0-10000"].version
    assert moved.items(typeurls.CLUSTER)["checkout_v1"].version == first.items(typeurls.CLUSTER)["checkout_v1"].version


def test_dangling_references_are_reported() -> None:
    snapshot = build_snapshot([_rollout(clusters=(V1,))])  # route names v2, which has no cluster
    assert snapshot.inconsistencies() == ["RDS 'grpc-checkout' references missing CDS 'checkout_v2'",
                                          "RDS 'route-0.0.0.0-10000' references missing CDS 'checkout_v2'"]


def test_duplicate_resources_are_refused() -> None:
    resource = build_snapshot([_rollout()]).items(typeurls.CLUSTER)["checkout_v1"]
    with pytest.raises(ValueError, match="duplicate CDS resource 'checkout_v1'"):
        Snapshot.of([resource, resource])


# ---- injective cluster names and what Envoy would reject -----------------------------------------


def test_cluster_names_cannot_collide() -> None:
    assert cluster_name("shop", "eu-v1") != cluster_name("shop-eu", "v1")
    assert (cluster_name("shop", "eu-v1"), cluster_name("shop-eu", "v1")) == ("shop_eu-v1", "shop-eu_v1")
    eu = PublishedRollout.of("shop", LISTENER, ("a.example.com",), ((Backend("eu-v1", V1.endpoints), 100),),
                             (Backend("eu-v1", V1.endpoints),))
    shop_eu = PublishedRollout.of("shop-eu", LISTENER, ("b.example.com",), ((V2, 100),), (V2,))
    shop_eu = replace(shop_eu, route=(("shop-eu_v1", 100),), clusters=(("shop-eu_v1", V2),))
    rendered = render([eu, shop_eu])
    assert rendered.violations == () and rendered.snapshot is not None
    assert set(rendered.snapshot.items(typeurls.CLUSTER)) == {"shop_eu-v1", "shop-eu_v1"}


def test_a_domain_twice_in_one_route_configuration_is_a_violation_blamed_on_both() -> None:
    rendered = render([_rollout("r40", ("shop.example.com",)), _rollout("r40b", ("Shop.Example.com", "x.example.com"))])
    assert rendered.snapshot is None
    (violation,) = rendered.violations
    assert violation.rollouts == {"r40", "r40b"}
    assert "'Shop.Example.com' is served twice (virtual hosts r40 and r40b)" in violation.reason


def test_two_wildcards_on_one_listener_are_a_violation() -> None:
    rendered = render([_rollout("a", ("*",)), _rollout("b", ("*",))])
    assert [v.rollouts for v in rendered.violations] == [{"a", "b"}]


def test_the_same_hosts_on_different_listeners_are_fine() -> None:
    other = replace(_rollout("b", ("*",)), listener=ListenerSpec(address="0.0.0.0", port=10001))
    assert render([_rollout("a", ("*",)), other]).violations == ()


def test_two_different_resources_of_one_name_are_a_violation_not_a_crash() -> None:
    a = replace(_rollout("a", ("a.example.com",)), clusters=(("same", V1),), route=(("same", 100),))
    b = replace(_rollout("b", ("b.example.com",)), clusters=(("same", V2),), route=(("same", 100),))
    rendered = render([a, b])
    assert rendered.snapshot is None
    assert [v.rollouts for v in rendered.violations] == [{"a", "b"}]
    assert "two different EDS resources are both named 'same'" in rendered.violations[0].reason  # CDS alike


def test_a_route_to_a_missing_cluster_is_blamed_on_its_virtual_host() -> None:
    rendered = render([_rollout(clusters=(V1,)), _rollout("payments", ("pay.example.com",), route=((V1, 100),),
                                                          clusters=(V1,))])
    assert {v.rollouts for v in rendered.violations} == {frozenset({"checkout"})}
    assert any("names missing cluster 'checkout_v2'" in v.reason for v in rendered.violations)


def test_violations_read_the_bytes_not_the_model() -> None:
    config = route_pb2.RouteConfiguration(name="r", virtual_hosts=[
        route_components_pb2.VirtualHost(name="x", domains=["a", "A"]),
        route_components_pb2.VirtualHost(name="y", domains=[]),
    ])
    snapshot = Snapshot.of([Resource.from_message("r", typeurls.ROUTE, config)])
    reasons = [v.reason for v in violations(snapshot)]
    assert any("'A' is served twice (virtual hosts x and x)" in r for r in reasons), reasons
    assert any("virtual host y has no domain" in r for r in reasons), reasons


def test_route_configurations_name_their_virtual_hosts_as_parts() -> None:
    snapshot = build_snapshot([_rollout(), _rollout("payments", ("pay.example.com",))])
    parts = dict(snapshot.items(typeurls.ROUTE)["route-0.0.0.0-10000"].parts)
    assert set(parts) == {"checkout", "payments"}
    moved = build_snapshot([_rollout(route=((V1, 80), (V2, 20))), _rollout("payments", ("pay.example.com",))])
    after = dict(moved.items(typeurls.ROUTE)["route-0.0.0.0-10000"].parts)
    assert after["payments"] == parts["payments"] and after["checkout"] != parts["checkout"]
