"""The only module that knows Envoy's types: published traffic in, xDS resources out.

Naming (documented for users in README):
- cluster `<rollout>-<version>`: one per version; EDS when every endpoint is an IP address, STRICT_DNS
  (endpoints inline, re-resolved by Envoy) when any endpoint is a host name;
- listener `listener-<address>-<port>` and route configuration `route-<address>-<port>`: rollouts that
  share an address:port are virtual hosts of one listener and one route configuration;
- listener `<rollout>` with an `api_listener` and route configuration `grpc-<rollout>`: what a
  proxyless gRPC client on `xds:///<rollout>` asks for. Never sent to wildcard (Envoy) subscribers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from aviary.discovery import typeurls
from aviary.discovery.snapshot import Resource, Snapshot
from aviary.policy.schema import ListenerSpec
from aviary.traffic import Backend

HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
CONNECT_TIMEOUT_SECONDS = 2
# Builders of resources that depend only on their (hashable, immutable) inputs are memoized: a
# weight change re-encodes its route configurations and nothing else, and a cluster that several
# proxy groups share is encoded once.
BUILT_RESOURCES_KEPT = 8192


@dataclass(frozen=True, slots=True)
class PublishedRollout:
    """What one rollout contributes to a snapshot at one moment of a make-before-break sequence.

    `route` is what its virtual host routes to (backend, weight); `clusters` are the backends whose
    clusters exist, a superset of the route's: a new backend appears here first, an old one stays
    until every proxy has stopped routing to it.
    """

    name: str
    listener: ListenerSpec
    hosts: tuple[str, ...]
    route: tuple[tuple[Backend, int], ...]
    clusters: tuple[Backend, ...]


def cluster_name(rollout: str, version: str) -> str:
    return f"{rollout}-{version}"


def _address_part(address: str) -> str:
    return address.replace(":", "_").strip("[]")


def listener_name(listener: ListenerSpec) -> str:
    return f"listener-{_address_part(listener.address)}-{listener.port}"


def route_name(listener: ListenerSpec) -> str:
    return f"route-{_address_part(listener.address)}-{listener.port}"


def grpc_route_name(rollout: str) -> str:
    return f"grpc-{rollout}"


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _http_connection_manager(stat_prefix: str, route_config: str) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.CodecType.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=route_config),
        http_filters=[hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_packed(router_pb2.Router()))],
    )


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_listener(listener: ListenerSpec) -> Resource:
    name = listener_name(listener)
    route = route_name(listener)
    message = listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=listener.address.strip("[]"), port_value=listener.port
            )
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name=HCM_FILTER,
                        typed_config=_packed(_http_connection_manager(name, route)),
                    )
                ]
            )
        ],
    )
    return Resource.from_message(name, typeurls.LISTENER, message, references=(route,))


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_api_listener(rollout: str) -> Resource:
    route = grpc_route_name(rollout)
    message = listener_pb2.Listener(
        name=rollout,
        api_listener=api_listener_pb2.ApiListener(api_listener=_packed(_http_connection_manager(rollout, route))),
    )
    return Resource.from_message(rollout, typeurls.LISTENER, message, wildcard=False, references=(route,))


def _weighted_route(rollout: str, route: Sequence[tuple[Backend, int]]) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(
            weighted_clusters=route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=cluster_name(rollout, backend.version),
                        weight=wrappers_pb2.UInt32Value(value=weight),
                    )
                    for backend, weight in route
                ]
            )
        ),
    )


def _virtual_host(rollout: PublishedRollout, domains: Sequence[str]) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name=rollout.name, domains=list(domains), routes=[_weighted_route(rollout.name, rollout.route)]
    )


def _route_clusters(rollout: PublishedRollout) -> list[str]:
    return [cluster_name(rollout.name, backend.version) for backend, _ in rollout.route]


def build_route_configuration(name: str, rollouts: Sequence[PublishedRollout]) -> Resource:
    ordered = sorted(rollouts, key=lambda r: r.name)
    message = route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[_virtual_host(r, r.hosts) for r in ordered]
    )
    references = [c for r in ordered for c in _route_clusters(r)]
    return Resource.from_message(name, typeurls.ROUTE, message, references=references)


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_grpc_route_configuration(rollout: PublishedRollout) -> Resource:
    name = grpc_route_name(rollout.name)
    message = route_pb2.RouteConfiguration(name=name, virtual_hosts=[_virtual_host(rollout, ["*"])])
    return Resource.from_message(name, typeurls.ROUTE, message, references=_route_clusters(rollout))


def _load_assignment(name: str, backend: Backend) -> endpoint_pb2.ClusterLoadAssignment:
    # gRPC clients NACK an assignment without locality or load_balancing_weight; Envoy does not mind.
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address=endpoint.host.strip("[]"), port_value=endpoint.port
                                )
                            )
                        )
                    )
                    for endpoint in backend.endpoints
                ],
            )
        ],
    )


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_cluster(rollout: str, backend: Backend) -> tuple[Resource, ...]:
    """The cluster for one version, plus its load assignment when it is served over EDS."""
    name = cluster_name(rollout, backend.version)
    common = {
        "name": name,
        "connect_timeout": duration_pb2.Duration(seconds=CONNECT_TIMEOUT_SECONDS),
        "lb_policy": cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
    }
    if all(endpoint.is_ip for endpoint in backend.endpoints):
        cluster = cluster_pb2.Cluster(
            type=cluster_pb2.Cluster.DiscoveryType.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source()),
            **common,
        )
        return (
            Resource.from_message(name, typeurls.CLUSTER, cluster, references=(name,)),
            Resource.from_message(name, typeurls.ENDPOINT, _load_assignment(name, backend)),
        )
    cluster = cluster_pb2.Cluster(
        type=cluster_pb2.Cluster.DiscoveryType.STRICT_DNS,
        load_assignment=_load_assignment(name, backend),
        **common,
    )
    return (Resource.from_message(name, typeurls.CLUSTER, cluster),)


def build_snapshot(rollouts: Iterable[PublishedRollout]) -> Snapshot:
    """One group's snapshot: listeners, routes, clusters and endpoints for these rollouts."""
    rollouts = list(rollouts)
    resources: list[Resource] = []
    by_listener: dict[str, list[PublishedRollout]] = {}
    listeners: dict[str, ListenerSpec] = {}
    for rollout in rollouts:
        if not rollout.route:  # being removed: only its clusters remain, until proxies let go
            for backend in rollout.clusters:
                resources.extend(build_cluster(rollout.name, backend))
            continue
        by_listener.setdefault(rollout.listener.key, []).append(rollout)
        listeners[rollout.listener.key] = rollout.listener
        resources.append(build_api_listener(rollout.name))
        resources.append(build_grpc_route_configuration(rollout))
        for backend in rollout.clusters:
            resources.extend(build_cluster(rollout.name, backend))
    for key, members in by_listener.items():
        listener = listeners[key]
        resources.append(build_listener(listener))
        resources.append(build_route_configuration(route_name(listener), members))
    return Snapshot.of(resources)
