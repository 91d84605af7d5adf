"""From desired traffic to published snapshots, make-before-break.

`TrafficDirector.set_desired_traffic()` is the one place a rollout's weights are set; the rollout
engine drives it, and so do tests. What the director publishes trails what is desired by the ACKs
of the proxies that serve the rollout:

1. a backend that is new gets its cluster (and load assignment) published, while the route still
   sends traffic where it did;
2. once every proxy that subscribes to that cluster has ACKed it and its endpoints, the route
   moves to the desired weights (one RDS update);
3. a backend no longer desired keeps its cluster until every proxy that subscribes to the route
   has ACKed the route that no longer names it; then the cluster is removed.

With no proxy connected every gate is open and all three happen in one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from aviary.discovery import typeurls
from aviary.discovery.cache import DEFAULT_GROUP, SnapshotCache
from aviary.discovery.gates import cluster_acked, route_acked
from aviary.discovery.proxy_events import (
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    SubscriptionChanged,
)
from aviary.discovery.proxy_status import ProxyStatus, ProxyView
from aviary.discovery.resources import (
    PublishedRollout,
    build_snapshot,
    cluster_name,
    grpc_route_name,
    listener_name,
    route_name,
)
from aviary.discovery.snapshot import Snapshot
from aviary.policy.schema import ListenerSpec
from aviary.traffic import Backend, DesiredTraffic

log = logging.getLogger("aviary.director")

MAX_PASSES = 8


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a rollout is served: from its policy file, independent of weights."""

    listener: ListenerSpec
    hosts: tuple[str, ...]
    proxy_cluster: str | None = None


@dataclass(slots=True)
class _Published:
    route: tuple[tuple[Backend, int], ...]
    clusters: dict[str, Backend] = field(default_factory=dict)  # version -> backend


@dataclass(frozen=True, slots=True)
class RolloutNack:
    rollout: str
    node_id: str
    type_url: str
    message: str


AckListener = Callable[[str, DesiredTraffic], None]
NackListener = Callable[[RolloutNack], None]


class TrafficDirector:
    def __init__(self, cache: SnapshotCache, proxies: ProxyStatus) -> None:
        self._cache = cache
        self._proxies = proxies
        self._placements: dict[str, Placement] = {}
        self._desired: dict[str, DesiredTraffic] = {}
        self._published: dict[str, _Published] = {}
        self._acked: dict[str, DesiredTraffic] = {}
        self._built: list[tuple[str, tuple[PublishedRollout, ...]]] | None = None
        self._unsettled: set[str] = set()
        self._waiting: set[int] = set()  # stream ids of the proxies an unsettled rollout waits for
        self._removing: set[str] = set()  # removed rollouts whose clusters wait for route ACKs
        self._expected: set[str] = set()  # node ids to wait for after a restart
        self._expected_until = 0.0
        self._ack_listeners: list[AckListener] = []
        self._nack_listeners: list[NackListener] = []
        proxies.subscribe(self._on_proxy_event)

    # ---- inputs -------------------------------------------------------------------------

    def set_rollout(self, name: str, placement: Placement, traffic: DesiredTraffic) -> None:
        """Declare or update a rollout's placement and desired traffic together."""
        self._placements[name] = placement
        self.set_desired_traffic(name, traffic)

    def set_desired_traffic(self, name: str, traffic: DesiredTraffic) -> None:
        """THE place where a rollout's canary weight is set."""
        if name not in self._placements:
            raise KeyError(f"unknown rollout {name!r}")
        self._removing.discard(name)
        if self._desired.get(name) != traffic:
            log.info("rollout %s: desired %s", name, _describe(traffic))
        self._desired[name] = traffic
        self.reconcile()

    def set_canary_weight(self, name: str, weight: int) -> None:
        """Convenience over set_desired_traffic for a rollout that already has a canary."""
        current = self._desired[name]
        self.set_desired_traffic(name, replace(current, canary_weight=weight))

    def remove_rollout(self, name: str) -> None:
        """Remove make-before-break: the virtual host goes first, its clusters once that is ACKed."""
        self._desired.pop(name, None)
        self._acked.pop(name, None)
        published = self._published.get(name)
        if published is None:
            self._placements.pop(name, None)
        else:
            published.route = ()
            self._removing.add(name)
        self.reconcile()

    def expect_proxies(self, node_ids: Iterable[str], grace: float) -> None:
        """After a restart: keep every gate closed until these proxies are back, or `grace` s pass.

        With no proxy connected every gate would be open, so a restarted control plane could
        promote, or remove a cluster a proxy still routes to, before that proxy has even
        reconnected. The proxies the previous process served are waited for instead.
        """
        self._expected = set(node_ids)
        if not self._expected:
            return
        self._expected_until = time.monotonic() + grace
        log.info("waiting up to %.0fs for %d proxies to reconnect: %s", grace, len(self._expected),
                 ", ".join(sorted(self._expected)))
        with contextlib.suppress(RuntimeError):  # no running loop: the deadline is checked lazily
            asyncio.get_running_loop().call_later(grace, self.reconcile)

    def _awaiting_reconnect(self) -> bool:
        if not self._expected:
            return False
        # Back means: ACKed a response on its new stream. A stream that has only sent its first
        # requests has subscribed to some types and not yet to the others, and the gates count a
        # type a proxy does not subscribe to as done: on its first EDS or LDS request the route
        # would move and the old cluster go before the proxy had applied anything.
        self._expected -= {proxy.node_id for proxy in self._proxies if proxy.acked}
        if self._expected and time.monotonic() >= self._expected_until:
            log.warning("proxies did not reconnect within the grace period: %s", ", ".join(sorted(self._expected)))
            self._expected.clear()
        elif not self._expected:
            log.info("every proxy served before the restart is back")
        return bool(self._expected)

    def on_traffic_acked(self, listener: AckListener) -> None:
        """`listener(rollout, traffic)` when every serving proxy ACKed the route for `traffic`."""
        self._ack_listeners.append(listener)

    def on_nack(self, listener: NackListener) -> None:
        self._nack_listeners.append(listener)

    # ---- reads --------------------------------------------------------------------------

    def desired(self, name: str) -> DesiredTraffic | None:
        return self._desired.get(name)

    def acked(self, name: str) -> DesiredTraffic | None:
        """The desired traffic that every serving proxy has ACKed, if the latest one was."""
        return self._acked.get(name)

    def rollout_names(self) -> list[str]:
        return sorted(self._placements)

    def published_route(self, name: str) -> dict[str, int]:
        published = self._published.get(name)
        return {b.version: w for b, w in published.route} if published else {}

    # ---- the make-before-break loop -----------------------------------------------------

    def reconcile(self) -> None:
        for _ in range(MAX_PASSES):
            if not self._advance():
                break
        self._notify_acked()
        self._unsettled = {name for name in self._desired if not self._settled(name)} | self._removing
        self._waiting = {p.stream_id for p in self._proxies if self._holds_up(p)} if self._unsettled else set()

    def _settled(self, name: str) -> bool:
        """Published exactly as desired, nothing retiring, and the ACK of it reported."""
        desired, published = self._desired[name], self._published.get(name)
        if published is None:
            return False
        wanted = _route_of(desired)
        return (
            published.route == wanted
            and published.clusters.keys() == {b.version for b, _ in wanted}
            and self._acked.get(name) == desired
        )

    def _advance(self) -> bool:
        """One pass: move each rollout's published state as far as the gates allow, publish."""
        for name in list(self._removing):
            if self._removal_acked(name):
                self._removing.discard(name)
                del self._published[name], self._placements[name]
        for name, desired in self._desired.items():
            published = self._published.get(name)
            wanted = _route_of(desired)
            if published is None:
                published = self._published[name] = _Published(route=wanted)
            for backend, _ in wanted:
                published.clusters[backend.version] = backend  # new, or new endpoints (EDS update)
            if published.route != wanted and all(
                self._cluster_ready(name, backend) for backend, _ in wanted
            ):
                published.route = wanted
            retiring = self._retiring(name)
            if retiring and self._route_acked(name, without=retiring):
                for version in [v for v in published.clusters if cluster_name(name, v) in retiring]:
                    del published.clusters[version]
        return self._publish()

    def _publish(self) -> bool:
        """Build and publish snapshots, but only when the published model changed."""
        groups = {p.proxy_cluster for p in self._placements.values() if p.proxy_cluster}
        model = [
            (
                group,
                tuple(
                    self._published_rollout(name)
                    for name, placement in sorted(self._placements.items())
                    if name in self._published and placement.proxy_cluster in (None, group or None)
                ),
            )
            for group in [DEFAULT_GROUP, *sorted(groups)]
        ]
        if model == self._built:
            return False
        snapshots: dict[str, Snapshot] = {group: build_snapshot(members) for group, members in model}
        self._cache.publish(snapshots)
        self._built = model
        return True

    def _published_rollout(self, name: str) -> PublishedRollout:
        placement = self._placements[name]
        published = self._published[name]
        return PublishedRollout(
            name=name,
            listener=placement.listener,
            hosts=placement.hosts,
            route=published.route,
            clusters=tuple(published.clusters[v] for v in sorted(published.clusters)),
        )

    def _serving(self, name: str) -> Iterable[tuple[ProxyView, Snapshot]]:
        """Connected proxies that receive this rollout, with the snapshot they are being served."""
        placement = self._placements[name]
        for proxy in self._proxies:
            group = self._cache.group_of(proxy.node_cluster)
            if placement.proxy_cluster is None or placement.proxy_cluster == group:
                yield proxy, self._cache.snapshot_for(proxy.node_cluster)

    def _cluster_ready(self, name: str, backend: Backend) -> bool:
        if self._awaiting_reconnect():
            return False
        cluster = cluster_name(name, backend.version)
        return all(cluster_acked(proxy, snapshot, cluster) for proxy, snapshot in self._serving(name))

    def _route_acked(self, name: str, without: frozenset[str] = frozenset()) -> bool:
        """Every serving proxy ACKed the published route(s), and those no longer name `without`."""
        if self._awaiting_reconnect():
            return False
        routes = self._route_names(name)
        return all(route_acked(proxy, snapshot, routes, without) for proxy, snapshot in self._serving(name))

    def _removal_acked(self, name: str) -> bool:
        """Every serving proxy ACKed routes without this rollout (or its listener is gone)."""
        if self._awaiting_reconnect():
            return False
        routes, clusters = self._route_names(name), self._cluster_names(name)
        return all(
            route_acked(proxy, snapshot, routes, clusters, missing_ok=True) for proxy, snapshot in self._serving(name)
        )

    def _cluster_names(self, name: str) -> frozenset[str]:
        return frozenset(cluster_name(name, version) for version in self._published[name].clusters)

    def _route_names(self, name: str) -> tuple[str, str]:
        return route_name(self._placements[name].listener), grpc_route_name(name)

    def _retiring(self, name: str) -> frozenset[str]:
        published, desired = self._published[name], self._desired[name]
        keep = {b.version for b, _ in published.route} | {b.version for b, _ in _route_of(desired)}
        return frozenset(cluster_name(name, v) for v in published.clusters if v not in keep)

    def _holds_up(self, proxy: ProxyView) -> bool:
        """Whether this proxy is what an unsettled rollout waits for at its current stage."""
        group = self._cache.group_of(proxy.node_cluster)
        snapshot = self._cache.snapshot_for(proxy.node_cluster)
        for name in self._unsettled:
            placement, published = self._placements[name], self._published.get(name)
            if published is None or placement.proxy_cluster not in (None, group):
                continue
            if name in self._removing:
                routes, clusters = self._route_names(name), self._cluster_names(name)
                if not route_acked(proxy, snapshot, routes, clusters, missing_ok=True):
                    return True
                continue
            wanted = _route_of(self._desired[name])
            if published.route != wanted:
                ready = all(cluster_acked(proxy, snapshot, cluster_name(name, b.version)) for b, _ in wanted)
            else:
                ready = route_acked(proxy, snapshot, self._route_names(name), self._retiring(name))
            if not ready:
                return True
        return False

    def _notify_acked(self) -> None:
        for name, desired in self._desired.items():
            published = self._published.get(name)
            if published is None or published.route != _route_of(desired) or not self._route_acked(name):
                continue
            if self._acked.get(name) == desired:
                continue
            self._acked[name] = desired
            for listener in self._ack_listeners:
                listener(name, desired)

    def _on_proxy_event(self, event: ProxyEvent) -> None:
        if isinstance(event, ResourcesNacked):
            self._report_nack(event)
        # Only while something waits for proxies, and only on what can open a gate: an ACK, a proxy
        # leaving, a subscription narrowing. A full pass runs once the last proxy that held things
        # up has moved on; until then each event re-checks only its own proxy.
        if not self._unsettled or not isinstance(event, ResourcesAcked | ProxyDisconnected | SubscriptionChanged):
            return
        if self._expected:
            self.reconcile()  # after a restart: each returning proxy may be the last one awaited
            return
        if event.stream_id in self._waiting:
            proxy = self._proxies.get(event.stream_id)
            if proxy is None or not self._holds_up(proxy):
                self._waiting.discard(event.stream_id)
        if not self._waiting:
            self.reconcile()

    def _report_nack(self, event: ResourcesNacked) -> None:
        proxy = self._proxies.get(event.stream_id)
        if proxy is None:
            return
        # A State-of-the-World response carries every resource of its type (all listeners, all
        # clusters), so the rejected ones are among those that differ from what the proxy ACKed
        # last; blaming all of them would roll back every canary for one rollout's bad listener.
        suspects = [
            resource
            for resource, version in event.resources.items()
            if proxy.acked_version_of(event.type_url, resource) != version
        ] or list(event.resources)
        for name in self._placements:
            if any(self._names_rollout(name, event.type_url, r) for r in suspects):
                nack = RolloutNack(name, proxy.node_id, event.type_url, event.message)
                for listener in self._nack_listeners:
                    listener(nack)

    def _names_rollout(self, name: str, type_url: str, resource: str) -> bool:
        """Whether a resource a proxy rejected belongs to this rollout."""
        placement = self._placements[name]
        if type_url == typeurls.ROUTE:
            return resource in (route_name(placement.listener), grpc_route_name(name))
        if type_url in (typeurls.CLUSTER, typeurls.ENDPOINT):
            published = self._published.get(name)
            return published is not None and resource in {cluster_name(name, v) for v in published.clusters}
        if type_url == typeurls.LISTENER:
            return resource in (name, listener_name(placement.listener))
        return False


def _route_of(traffic: DesiredTraffic) -> tuple[tuple[Backend, int], ...]:
    if traffic.canary is None:
        return ((traffic.stable, 100),)
    return ((traffic.stable, 100 - traffic.canary_weight), (traffic.canary, traffic.canary_weight))


def _describe(traffic: DesiredTraffic) -> str:
    return ", ".join(f"{v}={w}%" for v, w in traffic.weights().items())

