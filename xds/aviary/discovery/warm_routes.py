"""Make-before-break on one proxy: a route configuration goes to a proxy only once that proxy has
ACKed every cluster the routes name and those clusters' endpoints.

The director already orders a change across connected proxies: a canary's cluster is ACKed by all
of them before any route names it (``make_before_break``). A proxy that was away during the change
is not covered: when it reconnects (after a control-plane restart, or to another xDS worker when
its own died or hung) it asks for everything at once, and answering each request as it comes would
give it the new cluster and the route to it together. Envoy then routes to a cluster that is still
warming (waiting for its endpoints) and answers 503 until it is. So a stream holds such a route
response back until the proxy's ACKs cover what the route needs (`route_may_go`), and looks again
after each cluster or endpoint ACK.

Where the ACKs are read (`AckSource`):

- an ADS stream (SotW `SotwStream` or delta `DeltaStream`) reads its own clusters and endpoints;
- a per-type stream (RouteDiscoveryService and the others, one type each) reads the CDS and EDS
  streams of the same node (`node.id`) in the same process, found in `NodeStreams`; after an ACK
  on those streams, the node's RDS stream is woken to look again. Envoy opens its per-type streams
  on one HTTP/2 connection to one cluster, so with xDS workers they land in the same worker. When
  they do not (separate xDS clusters, or a proxy that reconnected one stream elsewhere), the RDS
  stream finds no CDS stream of its node and holds nothing: the route goes as it is asked for,
  and only the engine's ACK gates order the change (they merge a node's streams, `proxy_status`).

Only clusters the proxy subscribes to count: a gRPC client asks for the clusters its route names
after it gets the route, and handles the wait itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

from aviary.discovery import typeurls
from aviary.discovery.sharing import Sent
from aviary.discovery.snapshot import Snapshot

__all__ = ["AckSource", "NodeStreams", "needs", "route_may_go"]

_NEEDS_KEPT = 256  # distinct (routes, clusters) contents; evicted ones are recomputed
_needs: OrderedDict[tuple[str, str], tuple[frozenset[str], frozenset[str]]] = OrderedDict()


class AckSource(Protocol):
    """What a stream tells of one type it serves: its subscription, and what was ACKed last."""

    def subscription_of(self, type_url: str) -> tuple[bool, frozenset[str]] | None:
        """(wildcard, names) of the type, None if the stream has not asked for it."""
        ...

    def acked_of(self, type_url: str) -> Mapping[str, str] | None:
        """Name -> version of the type the proxy holds as of its latest ACK, None before one."""
        ...


class NodeStreams:
    """The per-type streams of each node in this process, by (node id, type URL), with the function
    that wakes each one (it then looks at the snapshot again: a held route is reconsidered).

    Envoy opens several streams of a type (without ADS, an EDS stream per cluster and an RDS stream
    per route configuration): `get` reads them as one (`_Together`), `wake` wakes them all.
    """

    def __init__(self) -> None:
        # by id(): the streams are dataclasses compared by value, not hashable
        self._streams: dict[tuple[str, str], dict[int, tuple[AckSource, Callable[[], None]]]] = {}

    def add(self, node_id: str, type_url: str, stream: AckSource, wake: Callable[[], None]) -> None:
        self._streams.setdefault((node_id, type_url), {})[id(stream)] = (stream, wake)

    def remove(self, node_id: str, type_url: str, stream: AckSource) -> None:
        streams = self._streams.get((node_id, type_url))
        if streams is not None:
            streams.pop(id(stream), None)
            if not streams:
                del self._streams[node_id, type_url]

    def get(self, node_id: str, type_url: str) -> AckSource | None:
        streams = self._streams.get((node_id, type_url))
        if not streams:
            return None
        if len(streams) == 1:
            return next(iter(streams.values()))[0]
        return _Together(tuple(stream for stream, _ in streams.values()))

    def wake(self, node_id: str, type_url: str) -> None:
        for _, wake in list(self._streams.get((node_id, type_url), {}).values()):
            wake()

    def __len__(self) -> int:
        return sum(len(streams) for streams in self._streams.values())


class _Together:
    """Several streams of one type read as one: the union of their subscriptions and ACKs."""

    def __init__(self, streams: tuple[AckSource, ...]) -> None:
        self._streams = streams

    def subscription_of(self, type_url: str) -> tuple[bool, frozenset[str]] | None:
        found = [s for s in (stream.subscription_of(type_url) for stream in self._streams) if s is not None]
        if not found:
            return None
        return any(wildcard for wildcard, _ in found), frozenset().union(*(names for _, names in found))

    def acked_of(self, type_url: str) -> Mapping[str, str] | None:
        found = [a for a in (stream.acked_of(type_url) for stream in self._streams) if a is not None]
        if not found:
            return None
        together: dict[str, str] = {}
        for acked in found:
            together.update(acked)
        return together


def needs(snapshot: Snapshot, routes: Sent) -> tuple[frozenset[str], frozenset[str]]:
    """(clusters the route configurations `routes` name, the load assignments of those clusters),
    computed once per content for every stream (the versions are content hashes)."""
    key = (routes.version, snapshot.type_versions[typeurls.CLUSTER])
    found = _needs.get(key)
    if found is not None:
        _needs.move_to_end(key)
        return found
    route_items, cluster_items = snapshot.items(typeurls.ROUTE), snapshot.items(typeurls.CLUSTER)
    clusters = frozenset().union(*(route_items[name].references for name in routes if name in route_items))
    assignments = frozenset().union(*(cluster_items[c].references for c in clusters if c in cluster_items))
    found = _needs[key] = (clusters, assignments)
    if len(_needs) > _NEEDS_KEPT:
        _needs.popitem(last=False)
    return found


def route_may_go(
    snapshot: Snapshot, routes: Sent, clusters: AckSource | None, endpoints: AckSource | None
) -> bool:
    """May `routes` go to a proxy now? `clusters` and `endpoints` are where its CDS and EDS ACKs
    are read (the stream itself for ADS, its sibling streams otherwise), None where there is none."""
    subscription = clusters.subscription_of(typeurls.CLUSTER) if clusters is not None else None
    if subscription is None or not routes:
        return True  # asks for clusters after routes, if at all (a gRPC client): nothing to wait for
    assert clusters is not None
    needed, assignments = needs(snapshot, routes)
    wildcard, names = subscription
    if not wildcard:
        needed = needed & names
        items = snapshot.items(typeurls.CLUSTER)
        assignments = frozenset().union(*(items[c].references for c in needed if c in items))
    if not needed:
        return True
    acked = clusters.acked_of(typeurls.CLUSTER)
    if acked is None or not acked.keys() >= needed:
        return False
    if endpoints is None or endpoints.subscription_of(typeurls.ENDPOINT) is None or not assignments:
        return True
    acked_endpoints = endpoints.acked_of(typeurls.ENDPOINT)
    return acked_endpoints is not None and acked_endpoints.keys() >= assignments
