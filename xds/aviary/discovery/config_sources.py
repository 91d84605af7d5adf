"""The snapshot as an Envoy on per-type discovery services must see it: routes and endpoints from
``api_config_source``, not ``ads``.

A listener names where its routes come from (the HCM's ``rds.config_source``) and an EDS cluster
where its endpoints come from (``eds_cluster_config.eds_config``). Aviary builds them with ``ads``
(`resources`): what an Envoy on ADS and a proxyless gRPC client (which accepts only ``ads`` or
``self``) need. An Envoy without ADS (``lds_config``/``cds_config`` with ``api_config_source``)
rejects ``ads``, and Envoy 1.40 does not implement ``self`` ("Missing config source specifier").
So a per-type stream serves the snapshot through `for_per_type`: the same resources with those
``ads`` sources replaced by an ``api_config_source`` to the Envoy's own xDS cluster (`XDS_CLUSTER`,
the name every bootstrap in this repository gives the control plane; a node may name another in
its metadata, `xds_cluster_of`), with the stream's protocol (GRPC or DELTA_GRPC). The access log's
sampling filter goes (its token buckets exist on ADS only) and with it the token buckets.

A rewritten resource keeps the version of the one it renders: it is the same configuration, and
the engine's ACK gates compare the versions a proxy ACKed with the published snapshot's, for every
proxy alike. The rendering is told apart where bytes are cached by content version
(`Snapshot.flavour`: `sharing.selection`, the delta stream's diffs and entries).
"""

from __future__ import annotations

from collections import OrderedDict

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2

from aviary.discovery import typeurls, wire
from aviary.discovery.snapshot import Resource, Snapshot

__all__ = ["XDS_CLUSTER", "XDS_CLUSTER_METADATA", "for_per_type", "xds_cluster_of"]

XDS_CLUSTER = "xds_cluster"
XDS_CLUSTER_METADATA = "aviary_xds_cluster"  # node.metadata key naming another xDS cluster
_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_KEPT = 64  # rendered snapshots (per snapshot content and flavour); an evicted one is rendered again
_rendered: OrderedDict[tuple[tuple[str, ...], str], Snapshot] = OrderedDict()


def xds_cluster_of(node: base_pb2.Node) -> str:
    """The cluster in the node's bootstrap that reaches this control plane."""
    named = node.metadata.fields.get(XDS_CLUSTER_METADATA)
    return named.string_value if named is not None and named.string_value else XDS_CLUSTER


def flavour(delta: bool, xds_cluster: str) -> str:
    """`Snapshot.flavour` of a per-type stream's view: its protocol and xDS cluster."""
    return f"{'DELTA_GRPC' if delta else 'GRPC'}:{xds_cluster}"


def for_per_type(snapshot: Snapshot, delta: bool, xds_cluster: str) -> Snapshot:
    """`snapshot` with its ``ads`` config sources pointing at ``xds_cluster`` instead (see the module
    docstring); rendered once per snapshot content and flavour, for every stream that needs it."""
    name = flavour(delta, xds_cluster)
    key = (tuple(snapshot.type_versions[t] for t in typeurls.PUSH_ORDER), name)
    found = _rendered.get(key)
    if found is not None:
        _rendered.move_to_end(key)
        return found
    source = config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=(
                config_source_pb2.ApiConfigSource.ApiType.DELTA_GRPC
                if delta
                else config_source_pb2.ApiConfigSource.ApiType.GRPC
            ),
            transport_api_version=config_source_pb2.ApiVersion.V3,
            grpc_services=[grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=xds_cluster))],
            set_node_on_first_message_only=True,
        ),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )  # fmt: skip
    resources = [
        *(_listener(r, source) for r in snapshot.items(typeurls.LISTENER).values()),
        *(_cluster(r, source) for r in snapshot.items(typeurls.CLUSTER).values()),
        *snapshot.items(typeurls.ROUTE).values(),
        *snapshot.items(typeurls.ENDPOINT).values(),
    ]
    found = _rendered[key] = Snapshot({t: {r.name: r for r in resources if r.type_url == t}
                                       for t in typeurls.PUSH_ORDER}, flavour=name)  # fmt: skip
    if len(_rendered) > _KEPT:
        _rendered.popitem(last=False)
    return found


def _value(resource: Resource) -> bytes:
    packed = any_pb2.Any.FromString(resource.any_bytes)
    return packed.value


def _rerendered(resource: Resource, value: bytes) -> Resource:
    """`resource` with new bytes and its own version (see the module docstring)."""
    any_bytes = wire.encode_any(resource.type_url, value)
    return Resource(resource.name, resource.type_url, resource.version, any_bytes, wire.resources_entry(any_bytes),
                    resource.wildcard, resource.references, resource.parts)  # fmt: skip


def _listener(resource: Resource, source: config_source_pb2.ConfigSource) -> Resource:
    listener = listener_pb2.Listener.FromString(_value(resource))
    changed = False
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            changed |= _hcm(network_filter.typed_config, source)
    if listener.HasField("api_listener"):
        changed |= _hcm(listener.api_listener.api_listener, source)
    return _rerendered(resource, listener.SerializeToString(deterministic=True)) if changed else resource


def _hcm(packed: any_pb2.Any, source: config_source_pb2.ConfigSource) -> bool:
    if packed.type_url != _HCM_TYPE:
        return False
    hcm = hcm_pb2.HttpConnectionManager.FromString(packed.value)
    changed = False
    if hcm.HasField("rds") and hcm.rds.config_source.HasField("ads"):
        hcm.rds.config_source.CopyFrom(source)
        changed = True
    for access_log in hcm.access_log:
        # The only filter Aviary gives an access log is the sampling one, whose token buckets come
        # over ADS and have no discovery service of their own: without ADS, Envoy sends every entry
        # and Aviary's cap on arrival keeps samplesPerSecond (`aviary.metrics.envoy_reports`).
        if access_log.HasField("filter"):
            access_log.ClearField("filter")
            changed = True
    if changed:
        packed.value = hcm.SerializeToString(deterministic=True)
    return changed


def _cluster(resource: Resource, source: config_source_pb2.ConfigSource) -> Resource:
    cluster = cluster_pb2.Cluster.FromString(_value(resource))
    if not cluster.eds_cluster_config.eds_config.HasField("ads"):
        return resource
    cluster.eds_cluster_config.eds_config.CopyFrom(source)
    return _rerendered(resource, cluster.SerializeToString(deterministic=True))
