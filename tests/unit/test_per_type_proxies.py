"""An Envoy without ADS is one proxy however many streams it opens (aviary.discovery.proxy_status),
and its listeners and clusters name its xDS cluster (aviary.discovery.config_sources)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from aviary.discovery import typeurls
from aviary.discovery.config_sources import XDS_CLUSTER, XDS_CLUSTER_METADATA, xds_cluster_of
from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    SubscriptionChanged,
)
from aviary.discovery.proxy_status import ProxyStatus

CDS, EDS = typeurls.CLUSTER, typeurls.ENDPOINT


def connected(stream: int, type_url: str = "", node: str = "n1") -> ProxyConnected:
    return ProxyConnected(stream, node, "edge", "peer", 0.0, type_url)


def acked(stream: int, type_url: str, resources: dict[str, str]) -> ResourcesAcked:
    return ResourcesAcked(stream, type_url, "v-" + ",".join(sorted(resources.values())), resources, 0.0, 0.0)


def test_a_nodes_per_type_streams_are_one_view_holding_the_union_of_each_type() -> None:
    status, heard = ProxyStatus(), list[ProxyEvent]()
    status.subscribe(heard.append)
    for event in (
        connected(1, CDS), connected(2, EDS), connected(3, EDS),  # an EDS stream per cluster
        SubscriptionChanged(2, EDS, False, frozenset({"a"})), SubscriptionChanged(3, EDS, False, frozenset({"b"})),
        acked(1, CDS, {"a": "1", "b": "1"}), acked(2, EDS, {"a": "x"}), acked(3, EDS, {"b": "y"}),
    ):  # fmt: skip
        status.apply(event)
    (view,) = status
    assert view.stream_id == 1 and view.subscription(EDS).names == {"a", "b"}
    assert dict(view.acked[EDS]) == {"a": "x", "b": "y"} and dict(view.acked[CDS]) == {"a": "1", "b": "1"}
    assert {e.stream_id for e in heard if not isinstance(e, ProxyConnected)} == {1}  # told as the view

    status.apply(ProxyDisconnected(3))  # cluster b's stream ends: its part goes
    assert dict(view.acked[EDS]) == {"a": "x"} and view.subscription(EDS).names == {"a"}
    status.apply(ProxyDisconnected(1))  # the first stream ends: the view stays for the others
    assert list(status) == [view] and CDS not in view.acked and CDS not in view.subscriptions
    status.apply(ProxyDisconnected(2))
    assert len(status) == 0 and heard[-1] == ProxyDisconnected(1)


def test_ads_streams_are_not_merged_and_another_node_is_another_proxy() -> None:
    status = ProxyStatus()
    for event in (connected(1), connected(2), connected(3, CDS, node="n2"), connected(4, EDS, node="n3")):
        status.apply(event)
    assert sorted(p.stream_id for p in status) == [1, 2, 3, 4]


def test_the_xds_cluster_is_xds_cluster_unless_the_node_names_another() -> None:
    node = base_pb2.Node(id="n1")
    assert xds_cluster_of(node) == XDS_CLUSTER
    node.metadata.fields[XDS_CLUSTER_METADATA].string_value = "control-plane"
    assert xds_cluster_of(node) == "control-plane"
