"""From traffic plans to published snapshots, make-before-break.

`TrafficDirector.set_desired_traffic()` is the one place a rollout's plan (weights and opened
cohorts) is set; the rollout engine drives it, and so do tests. What the director publishes trails
what is desired by the ACKs of the proxies that serve the rollout:

1. a backend that is new gets its cluster (and load assignment) published, while the route still
   sends traffic where it did;
2. once every proxy that subscribes to that cluster has ACKed it and its endpoints, the route
   moves to the desired plan, cohort routes and weights together (one RDS update);
3. a backend no longer desired keeps its cluster until every proxy that subscribes to the route
   has ACKed the route that no longer names it; then the cluster is removed.

With no proxy connected every gate is open and all three happen in one call.

Those decisions (each rollout's stage: adding, shifting, retiring, removing, settled; the gates;
the one predicate for "this proxy holds it up") are pure functions in `make_before_break`. This
class is the shell around them: it takes the inputs (plans, placements, proxy events), hands
`advance` what is published and what the proxies ACKed, publishes the result and repeats while
something moves, and reports ACKs and NACKs.

The gates are asked once per class of equal proxies (`ProxyStatus.classes()`: same node cluster,
subscriptions and ACKed responses), not once per proxy: a pass costs O(classes), a handful however
many proxies there are. While rollouts wait, the director keeps the proxies still behind (in a
class that holds a rollout up) and, per event, looks up only the verdict of the class the proxy
moved to (computed once per class between two passes): an ACK costs O(1), and the full pass runs
when the last proxy behind caught up.

Nothing is published that Envoy must reject (`resources.render` checks each group's snapshot):
a rollout whose content would break a rule is held at what was last published for it, the others
move on, and `blocked(name)` says why (logged at ERROR once per reason). A NACK is blamed on the
rollouts whose part of the rejected resource changed since the version that proxy last ACKed (for
a route configuration: their virtual host, narrowed on evidence when several changed at once, see
`nack_blame`), shown by `rejected(name)` until that proxy ACKs a later version of that type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from aviary.discovery import typeurls
from aviary.discovery.cache import DEFAULT_GROUP, SnapshotCache
from aviary.discovery.make_before_break import (
    Acks,
    Placement,
    Published,
    Routing,
    ServedProxy,
    Stage,
    Wait,
    advance,
    gate_open,
    holds_rollout_up,
    route_names,
    routing_of,
    served_hosts_and_route,
    waits_on_proxies,
)
from aviary.discovery.nack_blame import KnownRejection, narrowed, route_suspects
from aviary.discovery.proxy_events import (
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    SubscriptionChanged,
)
from aviary.discovery.proxy_status import ProxyClass, ProxyStatus, ProxyView
from aviary.discovery.resources import (
    PublishedRollout,
    grpc_route_name,
    listener_name,
    render,
    route_name,
    virtual_host_bytes,
)
from aviary.discovery.snapshot import EMPTY, Snapshot
from aviary.matching import CohortRule
from aviary.traffic import Backend, Stickiness, TrafficPlan

__all__ = ["Placement", "PublishedState", "RolloutNack", "Routing", "Stage", "TrafficDirector"]

log = logging.getLogger("aviary.director")

MAX_PASSES = 8
ROUTE_VERSIONS_KEPT = 4096  # virtual hosts of published route versions, to blame a NACK by
_KIND = {
    typeurls.LISTENER: "listener",
    typeurls.ROUTE: "route",
    typeurls.CLUSTER: "cluster",
    typeurls.ENDPOINT: "endpoints of cluster",
    typeurls.TOKEN_BUCKET: "token bucket",
}


@dataclass(frozen=True, slots=True)
class PublishedState:
    """What the director published for one rollout: to persist, so that a restart keeps every
    cluster a proxy's route may still name (retiring ones, ones under an older naming)."""

    route: tuple[tuple[str, int], ...]
    clusters: tuple[tuple[str, Backend], ...]
    cohorts: tuple[tuple[CohortRule, str], ...] = ()
    stickiness: Stickiness | None = None
    mirror: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class RolloutNack:
    rollout: str
    node_id: str
    type_url: str
    message: str


@dataclass(frozen=True, slots=True)
class _Rejection:
    stream_id: int
    type_url: str
    text: str
    resource: str = ""
    part: str | None = None  # for a route: the digest of the rollout's virtual host that was refused
    message: str = ""


AckListener = Callable[[str, TrafficPlan], None]
NackListener = Callable[[RolloutNack], None]
PublishedListener = Callable[[str, PublishedState | None], None]


class TrafficDirector:
    def __init__(self, cache: SnapshotCache, proxies: ProxyStatus) -> None:
        self._cache = cache
        self._proxies = proxies
        self._placements: dict[str, Placement] = {}
        self._desired: dict[str, TrafficPlan] = {}
        self._published: dict[str, Published] = {}  # those being removed too (`Published.removing`)
        self._stages: dict[str, Stage] = {}
        self._acked: dict[str, TrafficPlan] = {}
        self._built: list[tuple[str, tuple[PublishedRollout, ...]]] | None = None
        self._unsettled: set[str] = set()
        self._behind: set[int] = set()  # stream ids of the proxies an unsettled rollout waits for
        self._verdicts: dict[ProxyClass, bool] = {}  # does the class hold a rollout up, since the last pass
        self._expected: set[str] = set()  # node ids to wait for after a restart
        self._grace_timer: asyncio.TimerHandle | None = None
        self._expected_until = 0.0
        self._ack_listeners: list[AckListener] = []
        self._nack_listeners: list[NackListener] = []
        self._published_listeners: list[PublishedListener] = []
        self._reported: dict[str, PublishedState] = {}  # last state handed to published listeners
        self._good: dict[str, dict[str, PublishedRollout]] = {}  # group -> what is published per rollout
        self._blocked: dict[str, str] = {}  # rollout -> why its latest content is not published
        self._rejected: dict[str, _Rejection] = {}  # rollout -> the NACK that froze its resources
        self._route_parts: OrderedDict[str, dict[str, str]] = OrderedDict()  # route version -> vhost digests
        self._route_weights: OrderedDict[str, dict[str, dict[str, int]]] = OrderedDict()  # -> vhost -> split
        self._batching = 0
        self._batch_changed = False  # a change arrived during the batch: reconcile when it ends
        proxies.subscribe(self._on_proxy_event)

    # ---- inputs -------------------------------------------------------------------------

    def set_rollout(self, name: str, placement: Placement, traffic: TrafficPlan) -> None:
        """Declare or update a rollout's placement and desired traffic together."""
        self._placements[name] = placement
        self.set_desired_traffic(name, traffic)

    def set_desired_traffic(self, name: str, traffic: TrafficPlan) -> None:
        """THE place where a rollout's plan (canary weight, opened cohorts) is set."""
        if name not in self._placements:
            raise KeyError(f"unknown rollout {name!r}")
        published = self._published.get(name)
        if published is not None and published.removing:  # back before its removal completed
            self._published[name] = replace(published, removing=False)
        if self._desired.get(name) != traffic:
            log.info("rollout %s: desired %s (plan %s)", name, traffic.describe(), traffic.digest)
        self._desired[name] = traffic
        self._reconcile_unless_batching()

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
            self._published[name] = replace(published, handover=published.route, routing=Routing(()), removing=True)
        self._reconcile_unless_batching()

    def restore_published(self, name: str, state: PublishedState) -> None:
        """After a restart: what the previous process had published for this rollout (call before
        `set_rollout`). Its route stays until the current clusters are ACKed, and clusters no longer
        wanted retire only once no route a proxy ACKed names them, as in any change."""
        routing = Routing(state.route, state.cohorts, state.stickiness, state.mirror)
        self._published[name] = Published(routing, dict(state.clusters))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Apply several changes as one: nothing is published until the block ends.

        A host that moves from one rollout to another in one policy commit must not be published
        half-way (the old rollout still has it, the new one has it too: a duplicate domain).
        A batch in which nothing was set or removed publishes nothing (and costs nothing): the
        engine wraps every turn of its loop in one, most of them only check rounds."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and self._batch_changed:
                self._batch_changed = False
                self.reconcile()

    def _reconcile_unless_batching(self) -> None:
        if self._batching:
            self._batch_changed = True
        else:
            self.reconcile()

    def expect_proxies(self, node_ids: Iterable[str], grace: float) -> None:
        """After a restart: keep every gate closed until these proxies are back, or `grace` s pass.

        With no proxy connected every gate would be open, so a restarted control plane could
        promote, or remove a cluster a proxy still routes to, before that proxy has even
        reconnected. The proxies the previous process served are waited for instead.
        """
        self._expected = set(node_ids) - {proxy.node_id for proxy in self._proxies if _is_back(proxy)}
        if not self._expected:
            return
        self._expected_until = time.monotonic() + grace
        log.info("waiting up to %.0fs for %d proxies to reconnect: %s", grace, len(self._expected),
                 ", ".join(sorted(self._expected)))
        with contextlib.suppress(RuntimeError):  # no running loop: the deadline is checked lazily
            self._grace_timer = asyncio.get_running_loop().call_later(grace, self.reconcile)

    def close(self) -> None:
        """Stopping: no reconcile may run later (it would publish and save after the store closed)."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def awaited_proxies(self) -> frozenset[str]:
        """Proxies served before the restart that are not back yet (empty once the grace is over).

        The heartbeat saves them with the connected ones: a crash just after a restart, before they
        reconnected, must not make the next start forget to wait for them.
        """
        self._awaiting_reconnect()
        return frozenset(self._expected)

    def _awaiting_reconnect(self) -> bool:
        """Whether gates stay closed for proxies not back yet (they are struck off as they come
        back, `_returned`; here only the grace period is checked)."""
        if not self._expected:
            return False
        if time.monotonic() >= self._expected_until:
            log.warning("proxies did not reconnect within the grace period: %s", ", ".join(sorted(self._expected)))
            self._expected.clear()
        return bool(self._expected)

    def _returned(self, stream_id: int) -> bool:
        """Strike this event's proxy off the awaited ones if it is back; True if it was the last."""
        proxy = self._proxies.get(stream_id)
        if proxy is None or proxy.node_id not in self._expected or not _is_back(proxy):
            return False
        self._expected.discard(proxy.node_id)
        if self._expected:
            return False
        log.info("every proxy served before the restart is back")
        return True

    def on_traffic_acked(self, listener: AckListener) -> None:
        """`listener(rollout, traffic)` when every serving proxy ACKed the route for `traffic`."""
        self._ack_listeners.append(listener)

    def on_nack(self, listener: NackListener) -> None:
        self._nack_listeners.append(listener)

    def on_published(self, listener: PublishedListener) -> None:
        """`listener(rollout, state)` when what is published for a rollout changes (None: gone)."""
        self._published_listeners.append(listener)

    # ---- reads --------------------------------------------------------------------------

    def desired(self, name: str) -> TrafficPlan | None:
        return self._desired.get(name)

    def published_state(self, name: str) -> PublishedState | None:
        """What is published for this rollout now (None: nothing), as listeners are told."""
        published = self._published.get(name)
        if published is None:
            return None
        return PublishedState(published.route, tuple(sorted(published.clusters.items())), published.cohorts,
                              published.stickiness, published.mirror)

    def acked(self, name: str) -> TrafficPlan | None:
        """The desired traffic that every serving proxy has ACKed, if the latest one was."""
        return self._acked.get(name)

    def rollout_names(self) -> list[str]:
        return sorted(self._placements)

    def published_route(self, name: str) -> dict[str, int]:
        """Version -> weight of the route the director decided on (see `blocked` for whether it
        could be published)."""
        published = self._published.get(name)
        return {published.clusters[c].version: w for c, w in published.route} if published else {}

    def stage(self, name: str) -> Stage | None:
        """Where this rollout is in make-before-break, as of the last reconcile (None: unknown)."""
        return self._stages.get(name)

    def blocked(self, name: str) -> str | None:
        """Why this rollout's latest content is held back (Envoy would reject it), or None."""
        return self._blocked.get(name)

    def rejected(self, name: str) -> str | None:
        """"Envoy rejected route X (node N): reason" while a proxy's NACK freezes this rollout's
        resources; None once that proxy ACKed a later version of that type."""
        rejection = self._rejected.get(name)
        return rejection.text if rejection else None

    # ---- the make-before-break loop -----------------------------------------------------

    def reconcile(self) -> None:
        for _ in range(MAX_PASSES):
            if not self._advance():
                break
        self._notify_acked()
        removing = {name for name, published in self._published.items() if published.removing}
        self._unsettled = {name for name in self._desired if not self._settled(name)} | removing
        self._verdicts = {}
        self._behind = {
            stream_id
            for kind in (self._proxies.classes() if self._unsettled else ())
            if self._holds_up_class(kind)
            for stream_id in kind.members
        }

    def behind(self) -> frozenset[int]:
        """Stream ids of the proxies that an unsettled rollout waits for, as of the last event."""
        return frozenset(self._behind)

    def _settled(self, name: str) -> bool:
        """Published exactly as desired, nothing retiring, and the ACK of it reported."""
        desired, published = self._desired[name], self._published.get(name)
        if published is None or name in self._blocked:
            return False
        wanted = routing_of(name, desired)
        return (
            published.routing == wanted
            and published.clusters.keys() == {c for c, _ in wanted.route}
            and self._acked.get(name) == desired
        )

    def _advance(self) -> bool:
        """One pass of `make_before_break.advance` over what is published now, then publish."""
        advanced = advance(self._published, self._desired, self._placements, self._acks(), self._stages)
        self._published = dict(advanced.published)
        for name in advanced.removed:
            del self._placements[name]
        self._stages = dict(advanced.stages)
        return self._publish()

    def _acks(self) -> Acks:
        """The proxies' ACK state as the gates read it: each with its group and what it is served."""
        awaiting = self._awaiting_reconnect()
        return Acks(tuple(self._served(kind.sample) for kind in self._proxies.classes()), awaiting)

    def _served(self, proxy: ProxyView) -> ServedProxy:
        cluster = proxy.node_cluster
        return ServedProxy(proxy, self._cache.group_of(cluster), self._cache.snapshot_for(cluster))

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
        self._built = model
        snapshots: dict[str, Snapshot] = {}
        blocked: dict[str, str] = {}
        for group, members in model:
            snapshot, held = self._checked(group, members)
            blocked.update(held)
            snapshots[group] = snapshot
        for name, reason in sorted(blocked.items()):
            if self._blocked.get(name) != reason:
                log.error("rollout %s: not published, Envoy would reject it: %s", name, reason)
        for name in sorted(self._blocked.keys() - blocked.keys()):
            log.info("rollout %s: published again", name)
        self._blocked = blocked
        self._cache.publish(snapshots)
        for snapshot in snapshots.values():
            self._remember_routes(snapshot)
        self._report_published()
        return True

    def _checked(self, group: str, members: tuple[PublishedRollout, ...]) -> tuple[Snapshot, dict[str, str]]:
        """The group's snapshot to publish, and the rollouts held at their last published content.

        A rollout is blamed for a violation when its content changed since it was last published
        (so a running rollout is never held back by a newcomer that conflicts with it); when every
        party changed (nothing published yet), the lexically first is spared. A held rollout keeps
        what was last published for it, or is left out if nothing was. A violation no rollout can
        be blamed for keeps the group's current snapshot as it is.
        """
        good = self._good.get(group, {})
        current = {r.name: r for r in members}
        held: dict[str, str] = {}
        for _ in range(len(members) + 1):
            rendered = render(current.values())
            if rendered.snapshot is not None:
                self._good[group] = dict(current)
                self._remember_weights(rendered.snapshot, current.values())
                return rendered.snapshot, held
            newly: dict[str, str] = {}
            for violation in rendered.violations:
                parties = sorted(n for n in violation.rollouts if n in current and n not in held)
                changed = [n for n in parties if good.get(n) != current[n]]
                if len(changed) == len(parties) > 1:
                    changed = changed[1:]
                for name in changed or parties:
                    newly.setdefault(name, violation.reason)
            if not newly:
                break
            held.update(newly)
            for name in newly:
                if name in good:
                    current[name] = good[name]
                else:
                    del current[name]
        reasons = "; ".join(v.reason for v in render(current.values()).violations)
        log.error("proxy group %r: snapshot not published, Envoy would reject it: %s", group or "default", reasons)
        for member in members:
            held.setdefault(member.name, reasons)
        return self._cache.snapshots.get(group, EMPTY), held

    def _report_published(self) -> None:
        """Tell listeners (the state store) what each rollout now has published."""
        if not self._published_listeners:
            return
        states = {name: state for name in self._published if (state := self.published_state(name)) is not None}
        changes: list[tuple[str, PublishedState | None]] = [
            (name, state) for name, state in sorted(states.items()) if self._reported.get(name) != state
        ]
        changes += [(name, None) for name in sorted(self._reported.keys() - states.keys())]
        self._reported = states
        for name, maybe in changes:
            for listener in self._published_listeners:
                listener(name, maybe)

    def _remember_weights(self, snapshot: Snapshot, members: Iterable[PublishedRollout]) -> None:
        """Version -> weight of each virtual host, per route version: what a proxy that ACKed that
        version serves (`envoy_weights`)."""
        routes = snapshot.items(typeurls.ROUTE)
        for member in members:
            resource = routes.get(route_name(member.listener))
            if resource is None or not member.route:
                continue
            clusters = dict(member.clusters)
            split = {clusters[c].version if c in clusters else c: w for c, w in member.route}
            self._route_weights.setdefault(resource.version, {})[member.name] = split
            self._route_weights.move_to_end(resource.version)
        while len(self._route_weights) > ROUTE_VERSIONS_KEPT:
            self._route_weights.popitem(last=False)

    def envoy_weights(self, name: str) -> dict[str, int] | None:
        """Version -> weight that the serving proxies ACKed for this rollout, None when unknown (no
        proxy, or a version this process did not publish). When proxies differ, the one that lags
        (differs from what is published now) is reported: status shows what is still served."""
        placement = self._placements.get(name)
        if placement is None:
            return None
        route = route_name(placement.listener)
        current = self.published_route(name)
        seen: dict[str, int] | None = None
        for proxy, _ in self._serving(name):
            version = proxy.acked_version_of(typeurls.ROUTE, route)
            split = self._route_weights.get(version, {}).get(name) if version is not None else None
            if split is None:
                continue
            if split != current:
                return split
            seen = split
        return seen

    def _remember_routes(self, snapshot: Snapshot) -> None:
        for resource in snapshot.items(typeurls.ROUTE).values():
            if resource.version in self._route_parts:
                self._route_parts.move_to_end(resource.version)
                continue
            self._route_parts[resource.version] = dict(resource.parts)
            if len(self._route_parts) > ROUTE_VERSIONS_KEPT:
                self._route_parts.popitem(last=False)

    def _published_rollout(self, name: str) -> PublishedRollout:
        placement = self._placements[name]
        published = self._published[name]
        hosts, route = served_hosts_and_route(name, self._published, self._placements)
        return PublishedRollout(
            name=name,
            listener=placement.listener,
            hosts=hosts,
            route=route,
            clusters=tuple(sorted(published.clusters.items())),
            cohorts=published.cohorts,
            stickiness=published.stickiness,
            mirror=published.mirror,
            access_log=placement.access_log,
            samples_per_second=placement.samples_per_second,
        )

    def _serving(self, name: str) -> Iterable[tuple[ProxyView, Snapshot]]:
        """Connected proxies that receive this rollout, one per class of equals (see `_acks`), with
        the snapshot they are being served."""
        placement = self._placements[name]
        for kind in self._proxies.classes():
            proxy = kind.sample
            group = self._cache.group_of(proxy.node_cluster)
            if placement.proxy_cluster is None or placement.proxy_cluster == group:
                yield proxy, self._cache.snapshot_for(proxy.node_cluster)

    def _holds_up_class(self, kind: ProxyClass) -> bool:
        """`_holds_up` of every member of the class, asked once until the next pass."""
        verdict = self._verdicts.get(kind)
        if verdict is None:
            verdict = self._verdicts[kind] = self._holds_up(kind.sample)
        return verdict

    def _holds_up(self, proxy: ProxyView) -> bool:
        """Whether this proxy is what an unsettled rollout waits for at its current stage."""
        served = self._served(proxy)
        for name in self._unsettled:
            published = self._published.get(name)
            if published is None or not waits_on_proxies(name, self._published, self._placements):
                continue
            if holds_rollout_up(served, name, published, self._desired.get(name), self._placements[name]):
                return True
        return False

    def _notify_acked(self) -> None:
        for name, desired in self._desired.items():
            published = self._published.get(name)
            if name in self._blocked or published is None:
                continue
            if self._acked.get(name) == desired or published.routing != routing_of(name, desired):
                continue
            placement = self._placements[name]
            if not gate_open(placement, Wait(routes=route_names(name, placement)), self._acks()):
                continue
            self._acked[name] = desired
            for listener in self._ack_listeners:
                listener(name, desired)

    def _on_proxy_event(self, event: ProxyEvent) -> None:
        if isinstance(event, ResourcesNacked):
            self._report_nack(event)
        elif isinstance(event, ResourcesAcked | ProxyDisconnected) and self._rejected:
            self._clear_rejections(event)
        if self._expected and isinstance(event, ResourcesAcked | SubscriptionChanged) and self._returned(
                event.stream_id):
            self.reconcile()  # after a restart, every gate was closed until the last awaited proxy came back
            return
        # Only while something waits for proxies, and only on what can open a gate: an ACK, a proxy
        # leaving, a subscription narrowing. A full pass runs once the last proxy that held things
        # up has moved on; until then each event looks up the verdict of its proxy's class.
        if not self._unsettled or not isinstance(event, ResourcesAcked | ProxyDisconnected | SubscriptionChanged):
            return
        if self._expected:  # every gate is closed: nothing can move until the last one is back
            if time.monotonic() >= self._expected_until:
                self.reconcile()  # the grace is over (checked here too when there was no loop for a timer)
            return
        kind = self._proxies.class_of(event.stream_id)
        if kind is not None and self._holds_up_class(kind):
            self._behind.add(event.stream_id)  # e.g. subscribed to a route it has not ACKed yet
        else:
            self._behind.discard(event.stream_id)
        if not self._behind:
            self.reconcile()

    def _clear_rejections(self, event: ResourcesAcked | ProxyDisconnected) -> None:
        """A later version of the type ACKed by the proxy that rejected it (or that proxy gone)
        supersedes the rejection."""
        for name, rejection in list(self._rejected.items()):
            if rejection.stream_id != event.stream_id:
                continue
            if isinstance(event, ProxyDisconnected) or rejection.type_url == event.type_url:
                del self._rejected[name]
                log.info("rollout %s: %s superseded", name, rejection.text)

    def _report_nack(self, event: ResourcesNacked) -> None:
        proxy = self._proxies.get(event.stream_id)
        if proxy is None:
            return
        # A State-of-the-World response carries every resource of its type (all listeners, all
        # clusters), so the rejected ones are among those that differ from what the proxy ACKed
        # last; blaming all of them would roll back every canary for one rollout's bad listener.
        # A route configuration is shared by the rollouts of a listener: only those whose virtual
        # host differs from the proxy's last ACKed version of it are blamed.
        suspects = [
            resource
            for resource, version in event.resources.items()
            if proxy.acked_version_of(event.type_url, resource) != version
        ] or list(event.resources)
        blamed: dict[str, tuple[str, str]] = {}  # rollout -> (resource, version)
        for resource in suspects:
            version = event.resources[resource]
            for name in self._owners(proxy, event.type_url, resource, version, event.message):
                blamed.setdefault(name, (resource, version))
        for name, (resource, version) in sorted(blamed.items()):
            text = f"Envoy rejected {_KIND.get(event.type_url, event.type_url)} {resource} (node {proxy.node_id}): "
            part = self._route_parts.get(version, {}).get(name) if event.type_url == typeurls.ROUTE else None
            self._rejected[name] = _Rejection(event.stream_id, event.type_url, text + event.message, resource, part,
                                              event.message)
            nack = RolloutNack(name, proxy.node_id, event.type_url, event.message)
            for listener in self._nack_listeners:
                listener(nack)

    def _owners(self, proxy: ProxyView, type_url: str, resource: str, version: str, message: str) -> list[str]:
        """The rollouts a rejected resource (at `version`) is blamed on (for a route configuration:
        see `nack_blame`)."""
        names = [name for name in self._placements if self._names_rollout(name, type_url, resource)]
        if type_url != typeurls.ROUTE:
            return names
        rejected = self._route_parts.get(version)
        acked_version = proxy.acked_version_of(type_url, resource)
        accepted = self._route_parts.get(acked_version) if acked_version is not None else {}
        if rejected is None or accepted is None:
            return names  # a version this process did not publish: blame every rollout on it
        suspects = route_suspects(names, rejected, accepted)
        if len(suspects) <= 1:
            return suspects
        known = [
            KnownRejection(name, r.part, r.message)
            for name, r in self._rejected.items()
            if r.stream_id == proxy.stream_id and r.resource == resource and r.part is not None
        ]
        return narrowed(suspects, rejected, message, known, self._served_virtual_hosts(proxy, resource, version))

    def _served_virtual_hosts(self, proxy: ProxyView, resource: str, version: str) -> dict[str, bytes]:
        """The virtual hosts of the rejected route configuration, if it is still what this proxy is
        served (a newer version published since: none, the message is then not matched)."""
        served = self._cache.snapshot_for(proxy.node_cluster).items(typeurls.ROUTE).get(resource)
        if served is None or served.version != version:
            return {}
        return virtual_host_bytes(served)

    def _names_rollout(self, name: str, type_url: str, resource: str) -> bool:
        """Whether a resource a proxy rejected belongs to this rollout."""
        placement = self._placements[name]
        if type_url == typeurls.ROUTE:
            return resource in (route_name(placement.listener), grpc_route_name(name))
        if type_url in (typeurls.CLUSTER, typeurls.ENDPOINT):
            published = self._published.get(name)
            return published is not None and resource in published.clusters
        if type_url == typeurls.LISTENER:
            return resource in (name, listener_name(placement.listener))
        return False


def _is_back(proxy: ProxyView) -> bool:
    """A proxy awaited after a restart is back once it ACKed a response on its new stream. A stream
    that has only sent its first requests has subscribed to some types and not yet to the others,
    and the gates count a type a proxy does not subscribe to as done: on its first EDS or LDS
    request the route would move and the old cluster go before the proxy had applied anything.
    It must also have asked for its routes: Envoy asks in the order CDS, EDS, LDS, RDS, and one
    that ACKed clusters but has not yet named a route still routes by the one it had (the gates
    count a route it does not subscribe to as done, and would retire what it names)."""
    return bool(proxy.acked) and _asked_for_routes(proxy)


def _asked_for_routes(proxy: ProxyView) -> bool:
    """A proxy that asked for clusters has asked for routes too (one that does not route, has not)."""
    return typeurls.ROUTE in proxy.subscriptions or typeurls.CLUSTER not in proxy.subscriptions
