"""The per-type discovery services (ClusterDiscoveryService, EndpointDiscoveryService,
ListenerDiscoveryService, RouteDiscoveryService), State-of-the-World and incremental: what an Envoy
without ADS (``lds_config``/``cds_config`` with ``api_config_source``) talks to.

- each serves its own type, on the same stream logic as ADS; a request for another type ends the
  stream (INVALID_ARGUMENT), as other protocol violations do;
- a node's streams are one proxy to the engine (`ProxyStatus`): its ACK gates and status read them
  together, however many streams of a type Envoy opens (one EDS stream per cluster);
- a route waits until the node ACKed, on its CDS and EDS streams, the clusters it names and their
  endpoints (`warm_routes`), as on an ADS stream, where it also holds for delta now;
- the listeners and clusters a per-type stream sends point RDS and EDS at the Envoy's xDS cluster
  (``api_config_source``), not at ADS, with the versions ADS clients see (`config_sources`).
"""

from __future__ import annotations

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from aviary.discovery.config_sources import XDS_CLUSTER
from aviary.discovery.resources import PublishedRollout, build_snapshot, cluster_name
from aviary.discovery.snapshot import Resource
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend
from tests.conformance.clients import DELTA, SOTW, DeltaClient, SotwClient
from tests.conformance.conftest import CDS, EDS, LDS, RDS, Plane, assignment, cluster, listener, route

pytestmark = pytest.mark.timeout(30)


def linked() -> tuple[Resource, ...]:
    """Route `r` names cluster `a`, which needs load assignment `a`: what the route hold reads."""
    base_cluster, base_route = cluster("a"), route("r")
    return (
        Resource.from_bytes("a", CDS, _value(base_cluster), references=("a",)),
        assignment("a"),
        listener("l"),
        Resource.from_bytes("r", RDS, _value(base_route), references=("a",)),
    )


def _value(resource: Resource) -> bytes:
    return bytes(any_pb2.Any.FromString(resource.any_bytes).value)


@pytest.mark.parametrize("type_url", [CDS, EDS, LDS, RDS])
async def test_each_service_serves_its_own_type(plane: Plane, type_url: str) -> None:
    plane.publish(*linked())
    client = plane.client(only=type_url)
    client.start(type_url, ["r"] if type_url == RDS else ["a"] if type_url == EDS else [])
    update = await client.receive()
    assert (update.type_url, update.names) == (type_url, ["l" if type_url == LDS else "r" if type_url == RDS else "a"])
    client.ack(update)
    await plane.until_acked(type_url, update.resources)


async def test_a_request_for_another_type_ends_the_stream(plane: Plane) -> None:
    plane.publish(*linked())
    client = plane.client(only=CDS)
    client.start(CDS)
    client.ack(await client.receive())
    client.start(LDS)
    assert await client.wire.code() == grpc.StatusCode.INVALID_ARGUMENT
    first = plane.client("node-b", only=RDS)
    first.start(CDS)  # on its first request, too
    assert await first.wire.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_nodes_streams_are_one_proxy(plane: Plane) -> None:
    plane.publish(*linked(), cluster("b"), assignment("b", 9002))
    streams = {t: plane.client(only=t) for t in (CDS, EDS, LDS, RDS)}
    second_eds = plane.client(only=EDS)  # Envoy without ADS opens an EDS stream per cluster
    for type_url, names in ((CDS, []), (EDS, ["a"]), (LDS, []), (RDS, ["r"])):
        streams[type_url].start(type_url, names)
        streams[type_url].ack(await streams[type_url].receive())
    second_eds.start(EDS, ["b"])
    second_eds.ack(await second_eds.receive())
    await plane.until_acked(EDS, {"a": assignment("a").version, "b": assignment("b", 9002).version})
    views = [p for p in plane.proxies if p.node_id == "node-a"]
    assert len(views) == 1 and sorted(views[0].acked) == sorted([CDS, EDS, LDS, RDS])
    assert views[0].subscription(EDS).names == {"a", "b"}

    await second_eds.close()  # that cluster's stream ends: its part goes with it
    await plane.until_acked(EDS, {"a": assignment("a").version})
    await streams[LDS].close()  # no stream of the type left: the type starts afresh
    await plane.until(lambda: LDS not in (plane.proxy() or views[0]).acked, "LDS gone from the proxy")
    for client in (streams[CDS], streams[EDS], streams[RDS]):
        await client.close()
    await plane.until(lambda: plane.proxy() is None, "the proxy gone with its last stream")


async def test_a_route_waits_for_the_cluster_and_endpoints_acked_on_the_nodes_other_streams(plane: Plane) -> None:
    plane.publish(*linked())
    clusters, endpoints, routes = plane.client(only=CDS), plane.client(only=EDS), plane.client(only=RDS)
    clusters.start(CDS)
    sent_clusters = await clusters.receive()
    endpoints.start(EDS, ["a"])
    sent_endpoints = await endpoints.receive()
    routes.start(RDS, ["r"])
    await plane.until(lambda: (p := plane.proxy()) is not None and "r" in p.subscription(RDS).names, "RDS asked for")
    clusters.ack(sent_clusters)
    await plane.until_acked(CDS, sent_clusters.resources)
    assert plane.responses("node-a", RDS) == 0  # its cluster is ACKed, not yet its endpoints
    endpoints.ack(sent_endpoints)
    assert (await routes.receive()).names == ["r"]


async def test_a_route_waits_for_its_cluster_and_endpoints_on_an_ads_stream(plane: Plane) -> None:
    """The same hold on one ADS stream, State-of-the-World and (new) incremental."""
    plane.publish(*linked())
    client = plane.client()
    client.start(CDS)
    sent_clusters = await client.receive()
    client.start(EDS, ["a"])
    sent_endpoints = await client.receive()
    client.start(RDS, ["r"])
    await plane.until(lambda: (p := plane.proxy()) is not None and "r" in p.subscription(RDS).names, "RDS asked for")
    client.ack(sent_clusters)
    await plane.until_acked(CDS, sent_clusters.resources)
    assert plane.responses("node-a", RDS) == 0
    client.ack(sent_endpoints)
    update = await client.receive()
    assert (update.type_url, update.names) == (RDS, ["r"])


async def test_per_type_listeners_and_clusters_point_rds_and_eds_at_the_xds_cluster(plane: Plane) -> None:
    v1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
    snapshot = build_snapshot([PublishedRollout.of("shop", ListenerSpec(address="0.0.0.0", port=10000), ("*",),
                                                   ((v1, 100),), (v1,))])  # fmt: skip
    plane.publish(*(r for items in snapshot.resources.values() for r in items.values()))
    api_type = "DELTA_GRPC" if plane.protocol == DELTA else "GRPC"
    for type_url in (CDS, LDS):
        ads, per_type = plane.client(), plane.client(only=type_url)
        seen: dict[str, tuple[str, str, bytes]] = {}
        for client, how in ((ads, "ads"), (per_type, "api_config_source")):
            client.start(type_url)
            seen[how] = await _raw(client)
        for how, (name, _, value) in seen.items():
            source = _source(type_url, value)
            assert source.WhichOneof("config_source_specifier") == how, (name, source)
            if how == "api_config_source":
                assert source.api_config_source.grpc_services[0].envoy_grpc.cluster_name == XDS_CLUSTER
                assert source.api_config_source.ApiType.Name(source.api_config_source.api_type) == api_type
        assert seen["ads"][:2] == seen["api_config_source"][:2]  # the same name and version
        assert seen["ads"][0] == (cluster_name("shop", "v1") if type_url == CDS else "listener-0.0.0.0-10000")


async def _raw(client: SotwClient | DeltaClient) -> tuple[str, str, bytes]:
    """(name, version, bytes) of the one resource of the next response, read off the wire."""
    response = await client.wire.receive()
    if client.protocol == SOTW:
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        (resource,) = response.resources
        value = bytes(resource.value)
        kind = cluster_pb2.Cluster if response.type_url == CDS else listener_pb2.Listener
        return str(kind.FromString(value).name), response.version_info, value
    assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    (entry,) = response.resources
    return entry.name, entry.version, bytes(entry.resource.value)


def _source(type_url: str, value: bytes) -> config_source_pb2.ConfigSource:
    if type_url == CDS:
        return cluster_pb2.Cluster.FromString(value).eds_cluster_config.eds_config
    chain = listener_pb2.Listener.FromString(value).filter_chains[0]
    hcm = hcm_pb2.HttpConnectionManager.FromString(chain.filters[0].typed_config.value)
    return hcm.rds.config_source
