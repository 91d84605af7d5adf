"""`DeltaStream`: the incremental xDS rules without sockets (tests/conformance runs them over gRPC)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.delta import DeltaStream, versions_digest
from aviary.discovery.proxy_events import ProxyEvent, ResourcesAcked, ResourcesNacked
from aviary.discovery.snapshot import Resource, Snapshot, set_version

CDS, EDS = typeurls.CLUSTER, typeurls.ENDPOINT


def cluster(name: str, timeout: int = 1) -> Resource:
    message = cluster_pb2.Cluster(name=name)
    message.connect_timeout.seconds = timeout
    return Resource.from_message(name, CDS, message)


def assignment(name: str) -> Resource:
    return Resource.from_message(name, EDS, endpoint_pb2.ClusterLoadAssignment(cluster_name=name))


def publish(cache: SnapshotCache, *resources: Resource) -> None:
    cache.publish({"": Snapshot.of(resources)})


def request(type_url: str, subscribe: tuple[str, ...] = (), unsubscribe: tuple[str, ...] = (), nonce: str = "",
            error: str | None = None, initial: dict[str, str] | None = None,
            node: bool = False) -> discovery_pb2.DeltaDiscoveryRequest:
    message = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=subscribe, resource_names_unsubscribe=unsubscribe,
        response_nonce=nonce, initial_resource_versions=initial or {},
    )
    if node:
        message.node.CopyFrom(base_pb2.Node(id="envoy-1", cluster="edge"))
    if error is not None:
        message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return message


def decode(responses: list[bytes]) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    return [discovery_pb2.DeltaDiscoveryResponse.FromString(r) for r in responses]


def stream(cache: SnapshotCache, events: list[ProxyEvent]) -> DeltaStream:
    return DeltaStream(1, "ipv4:127.0.0.1:1", cache, events.append)


def test_the_wire_format_decodes_with_the_real_classes_and_carries_per_resource_versions() -> None:
    cache, events = SnapshotCache(), []
    a = cluster("a")
    publish(cache, a)
    [response] = decode(stream(cache, events).on_request(request(CDS, node=True)))
    assert response.type_url == CDS and response.nonce == "1"
    [resource] = response.resources
    assert (resource.name, resource.version) == ("a", a.version)
    unpacked = cluster_pb2.Cluster()
    assert resource.resource.Unpack(unpacked) and unpacked.name == "a"


def test_only_what_changed_travels_and_removals_are_named() -> None:
    cache, events = SnapshotCache(), []
    publish(cache, cluster("a"), cluster("b"))
    s = stream(cache, events)
    [first] = decode(s.on_request(request(CDS, node=True)))
    assert sorted(r.name for r in first.resources) == ["a", "b"]
    publish(cache, cluster("a", timeout=2), cluster("c"))
    [update] = decode(s.on_snapshot_changed())
    assert sorted(r.name for r in update.resources) == ["a", "c"]
    assert list(update.removed_resources) == ["b"]


def test_ack_reports_the_whole_state_of_the_type_with_the_sotw_version() -> None:
    cache, events = SnapshotCache(), []
    a, b = cluster("a"), cluster("b")
    publish(cache, a, b)
    s = stream(cache, events)
    [first] = decode(s.on_request(request(CDS, node=True)))
    s.on_request(request(CDS, nonce=first.nonce))
    [ack] = [e for e in events if isinstance(e, ResourcesAcked)]
    assert dict(ack.resources) == {"a": a.version, "b": b.version}
    assert ack.version == set_version([a, b]) == versions_digest(ack.resources)


def test_a_nack_is_reported_once_and_the_rejected_version_is_not_resent() -> None:
    cache, events = SnapshotCache(), []
    publish(cache, cluster("a"))
    s = stream(cache, events)
    [_first] = decode(s.on_request(request(CDS, node=True)))
    publish(cache, cluster("a", timeout=5))
    [second] = decode(s.on_snapshot_changed())
    assert s.on_request(request(CDS, nonce=second.nonce, error="bad")) == []
    assert s.on_request(request(CDS, nonce=second.nonce, error="bad")) == []  # repeated: not reported again
    nacks = [e for e in events if isinstance(e, ResourcesNacked)]
    assert [n.message for n in nacks] == ["bad"]
    assert s.on_snapshot_changed() == []


def test_names_that_do_not_exist_are_reported_removed_once_and_sent_when_they_appear() -> None:
    cache, events = SnapshotCache(), []
    s = stream(cache, events)
    [response] = decode(s.on_request(request(EDS, subscribe=("x",), node=True)))
    assert list(response.removed_resources) == ["x"] and not response.resources
    publish(cache, cluster("other"))
    assert s.on_snapshot_changed() == []
    publish(cache, assignment("x"))
    [appeared] = decode(s.on_snapshot_changed())
    assert [r.name for r in appeared.resources] == ["x"]


def test_a_reconnect_with_everything_current_gets_an_empty_response_whose_ack_records_the_state() -> None:
    cache, events = SnapshotCache(), []
    a = assignment("a")
    publish(cache, a)
    s = stream(cache, events)
    [response] = decode(s.on_request(request(EDS, subscribe=("a",), initial={"a": a.version}, node=True)))
    assert not response.resources and not response.removed_resources
    s.on_request(request(EDS, nonce=response.nonce))
    [ack] = [e for e in events if isinstance(e, ResourcesAcked)]
    assert dict(ack.resources) == {"a": a.version}


def test_initial_resource_versions_spare_unchanged_resources() -> None:
    cache, events = SnapshotCache(), []
    a, b = assignment("a"), assignment("b")
    publish(cache, a, b)
    s = stream(cache, events)
    got = s.on_request(request(EDS, subscribe=("a", "b"), initial={"a": a.version, "b": "old"}, node=True))
    [response] = decode(got)
    assert [r.name for r in response.resources] == ["b"]


def test_the_first_wildcard_request_is_answered_even_when_empty() -> None:
    cache, events = SnapshotCache(), []
    [response] = decode(stream(cache, events).on_request(request(CDS, node=True)))
    assert not response.resources and not response.removed_resources and response.nonce


def test_a_request_never_overtakes_an_unpushed_change_of_an_earlier_type() -> None:
    """The wake-up of a publish may be queued behind a request of a later type (an LDS ACK): the
    stream then answers the request with the clusters first, in PUSH_ORDER, SotW and delta alike."""
    from envoy.config.listener.v3 import listener_pb2

    from aviary.discovery.sotw import SotwStream

    def listener(port: int) -> Resource:
        message = listener_pb2.Listener(name="l")
        message.address.socket_address.port_value = port
        return Resource.from_message("l", typeurls.LISTENER, message)

    cache = SnapshotCache()
    publish(cache, cluster("a"), listener(1))
    sotw = SotwStream(1, "peer", cache, lambda e: None)
    delta = stream(cache, [])
    node = base_pb2.Node(id="envoy-1")
    for type_url in (CDS, typeurls.LISTENER):
        sotw.on_request(discovery_pb2.DiscoveryRequest(type_url=type_url, node=node))
        delta.on_request(request(type_url, node=type_url == CDS))
    publish(cache, cluster("a", timeout=2), listener(2))
    lds_ack = discovery_pb2.DiscoveryRequest(type_url=typeurls.LISTENER, response_nonce="2")
    got_sotw = [discovery_pb2.DiscoveryResponse.FromString(r).type_url for r in sotw.on_request(lds_ack)]
    got_delta = [r.type_url for r in decode(delta.on_request(request(typeurls.LISTENER, nonce="2")))]
    assert got_sotw == got_delta == [CDS, typeurls.LISTENER]
    assert sotw.on_snapshot_changed() == delta.on_snapshot_changed() == []  # the queued wake-up: nothing left


def test_shared_bodies_and_entries_are_bounded_by_bytes_and_count() -> None:
    from aviary.discovery.delta import _Kept

    kept = _Kept(entries=3, size=10, weigh=len)
    for key in "abcd":
        kept.keep(key, b"xx")
    assert list(kept) == ["b", "c", "d"] and kept.held == 6  # the count bound
    assert kept.get_fresh("b") == b"xx"  # used: now the newest
    kept.keep("e", b"xxxxxxx")
    assert list(kept) == ["b", "e"] and kept.held == 9  # the byte bound dropped the two oldest
    kept.keep("big", b"x" * 50)
    assert list(kept) == ["big"]  # one entry bigger than the bound is still kept, alone
