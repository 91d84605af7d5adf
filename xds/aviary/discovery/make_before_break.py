"""Make-before-break as pure functions over values: what to publish next while proxies catch up.

The engine decides what traffic should be (a `TrafficPlan` per rollout); this module decides what
may be *published* of it now, given what the proxies have ACKed. Each rollout is at one `Stage`:

- ADDING: a backend is new (or its endpoints changed): its cluster is published, the route still
  sends traffic where it did, until every serving proxy has ACKed the cluster and its endpoints;
- SHIFTING: the route has moved to the plan (weights and cohort routes in one update) and waits
  for every serving proxy's ACK of it;
- RETIRING: clusters the route no longer names stay until no route a serving proxy ACKed names
  them (the ACK of the moved route is what frees them, so a switch goes ADDING -> RETIRING);
- REMOVING: the rollout is gone: its virtual host leaves the route first, its clusters once the
  serving proxies ACKed a route without them;
- SETTLED: published as planned, ACKed, nothing retiring.

What a rollout waits for at its stage is a `Wait`; `holds_up(proxy, wait)` is the one predicate
for "this proxy holds it up", and a stage proceeds when no serving proxy holds it up (`gate_open`).
`advance` is one pass over every rollout; `TrafficDirector` (director.py) is the shell around it:
it collects the proxies' ACK state, publishes the snapshot after each pass (the gates read what is
published) and repeats until nothing moves. No I/O, no clock, no mutation of the inputs here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from aviary.discovery.gates import cluster_acked, route_acked
from aviary.discovery.proxy_status import ProxyView
from aviary.discovery.resources import cluster_name, grpc_route_name, route_name
from aviary.discovery.snapshot import Snapshot
from aviary.matching import CohortRule
from aviary.policy.schema import ListenerSpec
from aviary.traffic import Backend, Stickiness, TrafficPlan

Weights = tuple[tuple[str, int], ...]  # (cluster name, weight)


class Stage(enum.Enum):
    ADDING = "adding"
    SHIFTING = "shifting"
    RETIRING = "retiring"
    REMOVING = "removing"
    SETTLED = "settled"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a rollout is served: from its policy file, independent of weights."""

    listener: ListenerSpec
    hosts: tuple[str, ...]
    proxy_cluster: str | None = None
    access_log: bool = False  # its proxies send access logs to Aviary (analysis.provider: envoy)
    samples_per_second: int = 100  # access-log entries its proxies send per cluster and second (samplesPerSecond)


class Routing(NamedTuple):
    """What a rollout's virtual host says, as one value: it changes in one route update or not at all."""

    route: Weights  # the weighted default: (cluster name, weight)
    cohorts: tuple[tuple[CohortRule, str], ...] = ()  # routed before `route`: (cohort, cluster name)
    stickiness: Stickiness | None = None
    mirror: tuple[str, int] | None = None  # (cluster name, percent of `route`'s requests copied to it)


@dataclass(frozen=True, slots=True)
class Published:
    """What is published for one rollout (its `routing` is empty while it has no virtual host).

    `clusters` is never mutated: a change makes a new value. `handover` is the route a rollout
    being removed keeps serving while a rollout that takes one of its hosts over warms up."""

    routing: Routing
    clusters: Mapping[str, Backend]
    handover: Weights = ()
    removing: bool = False

    @property
    def route(self) -> Weights:
        return self.routing.route

    @property
    def cohorts(self) -> tuple[tuple[CohortRule, str], ...]:
        return self.routing.cohorts

    @property
    def stickiness(self) -> Stickiness | None:
        return self.routing.stickiness

    @property
    def mirror(self) -> tuple[str, int] | None:
        return self.routing.mirror


NOTHING = Routing(())


@dataclass(frozen=True, slots=True)
class ServedProxy:
    """One connected proxy as the gates see it: its ACK state and subscriptions, its proxy group,
    and the snapshot it is being served."""

    view: ProxyView
    group: str
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Acks:
    """What the proxies ACKed, as the gates read it. `awaiting`: after a restart, proxies served
    before are not back yet, and every gate stays closed."""

    proxies: tuple[ServedProxy, ...] = ()
    awaiting: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """What a rollout at its stage needs from each serving proxy: these clusters (and endpoints)
    ACKed, and these route configurations ACKed as published and naming none of `without`
    (`missing_ok`: one no longer published counts as done)."""

    clusters: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    without: frozenset[str] = frozenset()
    missing_ok: bool = False


def holds_up(proxy: ServedProxy, wait: Wait) -> bool:
    """THE predicate: this proxy has not yet applied what the rollout's next step relies on."""
    if not all(cluster_acked(proxy.view, proxy.snapshot, cluster) for cluster in wait.clusters):
        return True
    return not route_acked(proxy.view, proxy.snapshot, wait.routes, wait.without, wait.missing_ok)


def serves(placement: Placement, group: str) -> bool:
    """Whether a proxy of this group receives the rollout."""
    return placement.proxy_cluster is None or placement.proxy_cluster == group


def gate_open(placement: Placement, wait: Wait, acks: Acks) -> bool:
    """No serving proxy holds the rollout up (with none connected, every gate is open)."""
    if acks.awaiting:
        return False
    return not any(holds_up(proxy, wait) for proxy in acks.proxies if serves(placement, proxy.group))


# ---- plans, in cluster names -------------------------------------------------------------------


def backends_of(name: str, plan: TrafficPlan) -> dict[str, Backend]:
    """The clusters a plan needs published (cluster name -> backend)."""
    backends = (plan.stable,) if plan.canary is None else (plan.stable, plan.canary)
    return {cluster_name(name, backend.version): backend for backend in backends}


def route_of(name: str, plan: TrafficPlan) -> Weights:
    if plan.canary is None:
        return ((cluster_name(name, plan.stable.version), 100),)
    return (
        (cluster_name(name, plan.stable.version), 100 - plan.canary_weight),
        (cluster_name(name, plan.canary.version), plan.canary_weight),
    )


def routing_of(name: str, plan: TrafficPlan) -> Routing:
    """The virtual host a plan asks for. The mirror and the cohorts name the canary's cluster, which
    the weighted route always names too (at weight 0 as well): no part of a plan needs a cluster the
    weights do not already keep warm."""
    if plan.canary is None:
        return Routing(route_of(name, plan), (), plan.stickiness, None)
    canary = cluster_name(name, plan.canary.version)
    mirror = (canary, plan.mirror) if plan.mirror else None
    return Routing(route_of(name, plan), tuple((cohort, canary) for cohort in plan.cohorts), plan.stickiness, mirror)


def route_names(name: str, placement: Placement) -> tuple[str, str]:
    """The route configurations a rollout's virtual host is in: its listener's, and its gRPC one."""
    return route_name(placement.listener), grpc_route_name(name)


def retiring(published: Published, wanted: Routing) -> frozenset[str]:
    """Published clusters neither the published nor the wanted route names."""
    keep = {c for c, _ in published.route} | {c for c, _ in wanted.route}
    keep |= {c for _, c in published.cohorts}  # the canary's, named by the weights too; never retired apart
    return frozenset(c for c in published.clusters if c not in keep)


# ---- stages ------------------------------------------------------------------------------------


def wait_for(name: str, published: Published, plan: TrafficPlan | None, placement: Placement) -> Wait:
    """What the rollout waits for at its current stage (SHIFTING and RETIRING wait alike: the ACK
    of the published route, naming none of the retiring clusters)."""
    if published.removing or plan is None:
        return wait_of(name, Stage.REMOVING, published, NOTHING, placement)
    wanted = routing_of(name, plan)
    stage = Stage.ADDING if published.routing != wanted else Stage.SHIFTING
    return wait_of(name, stage, published, wanted, placement)


def holds_rollout_up(
    proxy: ServedProxy, name: str, published: Published, plan: TrafficPlan | None, placement: Placement
) -> bool:
    """Whether this proxy is what the rollout waits for at its stage: the per-proxy form of the
    gates `advance` opens (the director asks it of the one proxy that just ACKed)."""
    return serves(placement, proxy.group) and holds_up(proxy, wait_for(name, published, plan, placement))


def wait_of(name: str, stage: Stage, published: Published, wanted: Routing, placement: Placement) -> Wait:
    """What a rollout at `stage` waits for from each serving proxy."""
    if stage is Stage.REMOVING:
        return Wait(routes=route_names(name, placement), without=frozenset(published.clusters), missing_ok=True)
    if stage is Stage.ADDING:
        return Wait(clusters=tuple(cluster for cluster, _ in wanted.route))
    return Wait(routes=route_names(name, placement), without=retiring(published, wanted))


def stage_of(
    name: str, published: Published, plan: TrafficPlan | None, placement: Placement, acks: Acks,
    was_settled: bool = False,
) -> Stage:
    """The rollout's stage, from what is published, what is planned and what the proxies ACKed.
    `was_settled`: it was SETTLED with this very published state, so its ACK is not asked again."""
    if published.removing or plan is None:
        return Stage.REMOVING
    wanted = routing_of(name, plan)
    if published.routing != wanted:
        return Stage.ADDING
    if retiring(published, wanted):
        return Stage.RETIRING
    if was_settled or gate_open(placement, wait_of(name, Stage.SHIFTING, published, wanted, placement), acks):
        return Stage.SETTLED
    return Stage.SHIFTING


def waits_on_proxies(name: str, published: Mapping[str, Published], placements: Mapping[str, Placement]) -> bool:
    """A rollout being removed while a newcomer takes one of its hosts over waits for the newcomer's
    clusters (held up, or not, by that rollout's stage), not for its own route's ACK."""
    return not (published[name].removing and succeeded_by_a_newcomer(name, published, placements))


# ---- one pass ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Advanced:
    """The result of one pass: what to publish, the rollouts whose removal completed (gone from
    `published`), and each rollout's stage after the pass."""

    published: Mapping[str, Published]
    removed: frozenset[str]
    stages: Mapping[str, Stage]


def advance(
    published: Mapping[str, Published],
    desired: Mapping[str, TrafficPlan],
    placements: Mapping[str, Placement],
    acks: Acks,
    stages: Mapping[str, Stage] | None = None,
) -> Advanced:
    """One pass: move each rollout's published state as far as the gates allow.

    The gates read the snapshots in `acks` (what is published now), so a cluster added in this
    pass is not yet ACKed: the shell publishes the result and calls again until nothing moves.
    `desired` names every rollout that is not being removed; `published` also holds those being
    removed (and `placements` every rollout in either). `stages` are those the previous pass
    returned: a rollout SETTLED whose published state did not change stays SETTLED (another
    rollout's change to the shared route configuration does not make it shift again, and N
    settled rollouts cost no gate checks).
    """
    after = dict(published)
    removed: set[str] = set()
    for name, state in published.items():
        if state.removing and name not in desired:
            wait = wait_of(name, Stage.REMOVING, state, NOTHING, placements[name])
            if gate_open(placements[name], wait, acks):
                removed.add(name)
                del after[name]
    live_placements = {n: p for n, p in placements.items() if n not in removed}
    moved: set[str] = set()
    for name, plan in desired.items():
        placement = placements[name]
        wanted = routing_of(name, plan)
        before = after.get(name)
        if before is None:  # taking a host over: no virtual host until its clusters are ACKed
            before = Published(NOTHING if takes_over(name, after, live_placements) else wanted, {})
        state = replace(before, clusters={**before.clusters, **backends_of(name, plan)})  # new, or new endpoints
        adding = wait_of(name, Stage.ADDING, state, wanted, placement)
        if state.routing != wanted and gate_open(placement, adding, acks):
            state = replace(state, routing=wanted)  # one route update: the plan as a whole
            moved.add(name)
        leaving = retiring(state, wanted)
        if leaving and gate_open(placement, wait_of(name, Stage.RETIRING, state, wanted, placement), acks):
            state = replace(state, clusters={c: b for c, b in state.clusters.items() if c not in leaving})
        after[name] = state
    previous = stages or {}
    now = {
        name: stage_of(name, state, desired.get(name), placements[name], acks,
                       was_settled=previous.get(name) is Stage.SETTLED and published.get(name) == state)
        for name, state in after.items()
    }
    for name in moved:  # the gates read what was published before the move: its ACK is still to come
        if now[name] is Stage.SETTLED and any(serves(placements[name], p.group) for p in acks.proxies):
            now[name] = Stage.SHIFTING
    return Advanced(after, frozenset(removed), now)


# ---- hosts handed over between rollouts --------------------------------------------------------


def shares_a_host(mine: Placement, theirs: Placement) -> bool:
    return mine.listener.key == theirs.listener.key and bool(
        {h.casefold() for h in mine.hosts} & {h.casefold() for h in theirs.hosts}
    )


def takes_over(name: str, published: Mapping[str, Published], placements: Mapping[str, Placement]) -> bool:
    """A new rollout claims a host that a rollout being removed still serves (a rename)."""
    return any(
        state.removing and other != name and shares_a_host(placements[name], placements[other])
        for other, state in published.items()
    )


def succeeded_by_a_newcomer(
    name: str, published: Mapping[str, Published], placements: Mapping[str, Placement]
) -> bool:
    """A rollout being removed keeps serving its hosts while a rollout taking one of them over
    (a rename) has no virtual host yet: the host is handed over in one route update, never
    left to 404 or routed to clusters Envoy has not warmed."""
    return any(
        not state.route and shares_a_host(placements[name], placements[other])
        for other, state in published.items()
        if other != name and not state.removing
    )


def hosts_still_mine(name: str, published: Mapping[str, Published], placements: Mapping[str, Placement]) -> tuple[
        str, ...]:
    """The hosts a rollout being removed keeps while a newcomer warms up: not those another
    rollout already routes (one that moved there from another listener or took them over in
    the same change); a host served twice would make Envoy reject the whole route."""
    listener = placements[name].listener.key
    taken = {
        host.casefold()
        for other, state in published.items()
        if other != name and not state.removing and state.route and placements[other].listener.key == listener
        for host in placements[other].hosts
    }
    return tuple(h for h in placements[name].hosts if h.casefold() not in taken)


def served_hosts_and_route(
    name: str, published: Mapping[str, Published], placements: Mapping[str, Placement]
) -> tuple[tuple[str, ...], Weights]:
    """The hosts and weighted route to render for a rollout now (a rollout being removed keeps,
    while a newcomer warms up, the hosts no other rollout routes, with its last route)."""
    state, hosts = published[name], placements[name].hosts
    if state.removing and succeeded_by_a_newcomer(name, published, placements):
        hosts = hosts_still_mine(name, published, placements)
        return hosts, (state.handover if hosts else ())
    return hosts, state.route
