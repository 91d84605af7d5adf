"""Per-proxy gates of make-before-break: has this proxy applied what the next step relies on?

Pure predicates over one proxy's ACK state and the snapshot it is being served, so the director
can ask them for all proxies at once (a stage may proceed) or for the one proxy that just ACKed
(is it still holding things up?), which keeps a change to N proxies at O(N) work, not O(N^2).
"""

from __future__ import annotations

from collections.abc import Iterable

from aviary.discovery import typeurls
from aviary.discovery.proxy_status import ProxyView
from aviary.discovery.snapshot import Snapshot


def cluster_acked(proxy: ProxyView, snapshot: Snapshot, cluster: str) -> bool:
    """The proxy has the cluster as published, and its endpoints, if it subscribes to it at all."""
    published = snapshot.items(typeurls.CLUSTER).get(cluster)
    if published is None:
        return False  # not even published to this proxy's group yet
    if not proxy.subscription(typeurls.CLUSTER).covers(cluster):
        return True  # e.g. a gRPC client that only asks for the clusters its route names
    if proxy.acked_version_of(typeurls.CLUSTER, cluster) != published.version:
        return False
    assignment = snapshot.items(typeurls.ENDPOINT).get(cluster)
    return assignment is None or proxy.acked_version_of(typeurls.ENDPOINT, cluster) == assignment.version


def route_acked(
    proxy: ProxyView, snapshot: Snapshot, routes: Iterable[str], without: frozenset[str], missing_ok: bool = False
) -> bool:
    """The proxy ACKed every published route it subscribes to, and none of them names `without`.

    `missing_ok`: a route configuration no longer published counts as done (its listener is gone).
    """
    subscription = proxy.subscription(typeurls.ROUTE)
    for route in routes:
        if not subscription.covers(route):
            continue
        published = snapshot.items(typeurls.ROUTE).get(route)
        if published is None and missing_ok:
            continue
        if published is None or published.references & without:
            return False
        if proxy.acked_version_of(typeurls.ROUTE, route) != published.version:
            return False
    return True
