"""Make-before-break on one stream: a route configuration goes to a proxy only once that proxy has
ACKed, on the same stream, every cluster the routes name and those clusters' endpoints.

The director already orders a change across connected proxies: a canary's cluster is ACKed by all
of them before any route names it (``make_before_break``). A proxy that was away during the change
is not covered: when it reconnects (after a control-plane restart, or to another xDS worker when
its own died or hung) it asks for everything at once, and answering each request as it comes would
give it the new cluster and the route to it together. Envoy then routes to a cluster that is still
warming (waiting for its endpoints) and answers 503 until it is. So `SotwStream` holds such a route
response back until the stream's ACKs cover what the route needs (`clusters_acked`), and asks
again after each cluster or endpoint ACK.

Only clusters the stream subscribes to count: a gRPC client asks for the clusters its route names
after it gets the route, and handles the wait itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from aviary.discovery import typeurls
from aviary.discovery.sharing import Sent
from aviary.discovery.snapshot import Snapshot

__all__ = ["clusters_acked", "needs"]

_NEEDS_KEPT = 256  # distinct (routes, clusters) contents; evicted ones are recomputed
_needs: OrderedDict[tuple[str, str], tuple[frozenset[str], frozenset[str]]] = OrderedDict()


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


def clusters_acked(
    snapshot: Snapshot,
    routes: Sent,
    cluster_subscription: tuple[bool, frozenset[str]] | None,
    clusters_acked_here: Mapping[str, str] | None,
    endpoints_acked_here: Mapping[str, str] | None,
    asks_for_endpoints: bool,
) -> bool:
    """May `routes` go to a stream now? `cluster_subscription` is its CDS (wildcard, names), None if
    it has not asked for clusters; the ACKed mappings are name -> version of its latest ACKs."""
    if cluster_subscription is None or not routes:
        return True  # asks for clusters after routes, if at all (a gRPC client): nothing to wait for
    clusters, assignments = needs(snapshot, routes)
    wildcard, names = cluster_subscription
    if not wildcard:
        clusters = clusters & names
        items = snapshot.items(typeurls.CLUSTER)
        assignments = frozenset().union(*(items[c].references for c in clusters if c in items))
    if not clusters:
        return True
    if clusters_acked_here is None or not clusters_acked_here.keys() >= clusters:
        return False
    if not asks_for_endpoints or not assignments:
        return True
    return endpoints_acked_here is not None and endpoints_acked_here.keys() >= assignments
