"""The thin async loop around the pure rollout engine.

It gathers observations (policy files, proxy ACKs and NACKs, check results, admin commands, the
clock), feeds them one at a time to `aviary.policy.rollout.step`, records the new status, and
carries out the actions: `SetTraffic` goes to the traffic director, `RecordEvent` to the log and
the in-memory event history. Wake-ups are computed from the stored status (`next_wakeup`), not
from timers held in memory, so a restarted loop continues from whatever status it is handed.

Everything runs on one event loop task; callbacks from the director only enqueue events, so the
engine never re-enters itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from aviary.discovery.director import Placement, RolloutNack, TrafficDirector
from aviary.discovery.resources import cluster_name
from aviary.metrics.checks import run_checks
from aviary.metrics.prometheus import PrometheusProvider
from aviary.metrics.provider import MetricProvider
from aviary.policy.rollout import (
    Action,
    ChecksCompleted,
    Event,
    ProxyNacked,
    RecordEvent,
    Rejected,
    RolloutStatus,
    SetTraffic,
    SpecObserved,
    Tick,
    TransitionEvent,
    WeightAcked,
    checks_due,
    desired_traffic,
    next_wakeup,
    step,
)
from aviary.policy.schema import PolicySet, Rollout
from aviary.store.sqlite import SavedRollout, StateStore
from aviary.traffic import DesiredTraffic

log = logging.getLogger("aviary.engine")

EVENT_HISTORY = 200
ProviderFactory = Callable[[str], MetricProvider]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CommandRefused(Exception):
    rollout: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rollout}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Resumption:
    """How far a step had run before a restart, to credit once its weight is ACKed again."""

    elapsed: float
    step_index: int
    canary_version: str | None


def stopped_for_restart(status: RolloutStatus, last_alive: float) -> tuple[RolloutStatus, Resumption | None]:
    """A persisted status to continue from after a restart, `last_alive` being when the old process
    was last seen alive.

    The step's clock is stopped, exactly as while a step's weight waits for its ACK: nothing is
    time-driven until every proxy has confirmed the restored weight, so a step cannot end (and a
    canary cannot be promoted) while Envoy is still reconnecting. The time the step had run before
    the crash is returned, to be credited when the ACK comes. The analysis starts afresh: the step
    needs a new passing round over a window that begins after the restart. Counters are kept.
    """
    stopped = replace(status, step_started_at=None, step_outcome=None, step_checked_at=None)
    if status.step_started_at is None:
        return stopped, None
    elapsed = max(0.0, last_alive - status.step_started_at)
    return stopped, Resumption(elapsed, status.step_index, status.canary.version if status.canary else None)


def _placement_of(rollout: Rollout) -> Placement:
    spec = rollout.spec
    return Placement(spec.listener, spec.hosts, spec.proxy_cluster)


def _summary(status: RolloutStatus) -> str:
    canary = f", canary {status.canary.version} at {status.weight}%" if status.canary else ""
    return f"{status.phase.value}, stable {status.stable.version}{canary}"


class RolloutRunner:
    def __init__(
        self,
        director: TrafficDirector,
        default_prometheus: str | None = None,
        provider_factory: ProviderFactory = PrometheusProvider,
        clock: Clock = time.time,
        store: StateStore | None = None,
        prune: bool = False,
    ) -> None:
        self._director = director
        self._store = store
        self._prune = prune
        self._orphaned: set[str] = set()
        self._revision: str | None = None
        self._default_prometheus = default_prometheus
        self._provider_factory = provider_factory
        self._providers: dict[str, MetricProvider] = {}
        self._clock = clock
        self._rollouts: dict[str, Rollout] = {}
        self._status: dict[str, RolloutStatus] = {}
        self._placements: dict[str, Placement] = {}
        self._saved_revision: dict[str, str | None] = {}
        self._applied_revision: dict[str, str | None] = {}
        self._resuming: dict[str, Resumption] = {}
        self._history: dict[str, deque[TransitionEvent]] = {}
        self._inbox: asyncio.Queue[tuple[str, Event]] = asyncio.Queue()
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Callable[[TransitionEvent], None]] = []
        director.on_traffic_acked(self._on_traffic_acked)
        director.on_nack(self._on_nack)

    # ---- reads ---------------------------------------------------------------------------

    def status(self, name: str) -> RolloutStatus | None:
        return self._status.get(name)

    def statuses(self) -> dict[str, RolloutStatus]:
        return dict(self._status)

    def history(self, name: str) -> list[TransitionEvent]:
        return list(self._history.get(name, ()))

    def rollout(self, name: str) -> Rollout | None:
        return self._rollouts.get(name)

    def on_transition(self, listener: Callable[[TransitionEvent], None]) -> None:
        self._listeners.append(listener)

    def off_transition(self, listener: Callable[[TransitionEvent], None]) -> None:
        """Stop calling ``listener`` (registered with ``on_transition``); unknown ones are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def now(self) -> float:
        """The engine's clock: the time base of statuses and transition events."""
        return self._clock()

    def orphaned(self, name: str) -> bool:
        """Its policy file is gone, and without --prune it keeps serving as it was."""
        return name in self._orphaned

    def applied_revision(self, name: str) -> str | None:
        """The git commit this rollout's policy was last applied from (kept while it is orphaned)."""
        return self._applied_revision.get(name)

    @property
    def revision(self) -> str | None:
        """The git commit of the policies applied last (None for a directory)."""
        return self._revision

    # ---- restart -------------------------------------------------------------------------

    def restore(self, saved: Mapping[str, SavedRollout], last_alive: float | None = None) -> None:
        """Continue from persisted state: call before the first policies and before serving.

        Each rollout's traffic is published exactly as persisted, so reconnecting proxies are never
        sent an older weight than they have. A running step waits for the proxies to ACK that weight
        again, then continues with the time it had already spent; its analysis starts afresh.
        """
        for name, entry in saved.items():
            status, resumption = stopped_for_restart(entry.status, max(entry.saved_at, last_alive or 0.0))
            if resumption is not None:
                self._resuming[name] = resumption
            self._status[name] = status
            self._rollouts[name] = entry.rollout
            self._applied_revision[name] = entry.git_commit
            self._history[name] = deque(entry.events, maxlen=EVENT_HISTORY)
            self._publish(entry.rollout, desired_traffic(status))
            log.info("rollout %s restored: %s", name, _summary(status))

    # ---- inputs --------------------------------------------------------------------------

    def apply_policies(self, policy_set: PolicySet) -> None:
        """A new set of valid policy files: observe each spec; removed ones orphan or prune."""
        self._revision = policy_set.revision
        for name in sorted(set(self._rollouts) - set(policy_set.rollouts)):
            if self._prune:
                log.info("rollout %s removed from policies; pruning it", name)
                self._forget(name)
            elif name not in self._orphaned:
                log.warning("rollout %s removed from policies; it keeps serving as orphaned (no --prune)", name)
                self._orphaned.add(name)
        for name, rollout in sorted(policy_set.rollouts.items()):
            self._orphaned.discard(name)
            self._applied_revision[name] = policy_set.revision
            previous = self._rollouts.get(name)
            self._rollouts[name] = rollout
            if previous is None or previous.spec != rollout.spec or name not in self._status:
                self.handle(name, SpecObserved(rollout.spec))
            elif self._store is not None and self._saved_revision.get(name) != self._applied_revision[name]:
                self._save(self._status[name], [])

    def submit(self, name: str, event: Event) -> None:
        """Queue an event for the loop (safe from callbacks that run inside the engine)."""
        self._inbox.put_nowait((name, event))

    def command(self, name: str, event: Event) -> RolloutStatus:
        """Apply an admin command now; raise CommandRefused with the engine's reason if refused."""
        if name not in self._rollouts:
            raise KeyError(name)
        actions = self.handle(name, event)
        for action in actions:
            if isinstance(action, Rejected):
                raise CommandRefused(name, action.reason)
        return self._status[name]

    def handle(self, name: str, event: Event) -> list[Action]:
        """One step of the engine for one rollout, with its actions carried out."""
        rollout = self._rollouts.get(name)
        if rollout is None:
            return []  # an ACK or check result for a rollout removed meanwhile
        now = self._clock()
        status, actions = step(rollout.spec, self._status.get(name), event, now, rollout=name)
        status = self._credit_restored_step(name, status)
        if status != self._status.get(name):
            # Persist before anything is pushed: after a crash we must not serve an older weight.
            self._save(status, [a.event for a in actions if isinstance(a, RecordEvent)])
        self._status[name] = status
        self._execute(rollout, actions)
        return actions

    def _credit_restored_step(self, name: str, status: RolloutStatus) -> RolloutStatus:
        """Once a restored step's weight is ACKed again, count the time it ran before the restart."""
        resumption = self._resuming.get(name)
        if resumption is None:
            return status
        canary = status.canary.version if status.canary else None
        if (canary, status.step_index) != (resumption.canary_version, resumption.step_index):
            del self._resuming[name]  # another step or canary now: nothing to carry over
        elif status.step_started_at is not None:
            del self._resuming[name]
            return replace(status, step_started_at=status.step_started_at - resumption.elapsed)
        return status

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                timeout = self._until_next_wakeup()
                with contextlib.suppress(TimeoutError):
                    name, event = await asyncio.wait_for(self._inbox.get(), timeout)
                    self.handle(name, event)
                    while not self._inbox.empty():
                        name, event = self._inbox.get_nowait()
                        self.handle(name, event)
                self._wake_due()
        finally:
            for task in self._checks.values():
                task.cancel()
            self._checks.clear()

    def _until_next_wakeup(self) -> float | None:
        now = self._clock()
        times = [
            wake
            for name, status in self._status.items()
            if name not in self._checks and (wake := next_wakeup(self._rollouts[name].spec, status)) is not None
        ]
        return max(0.0, min(times) - now) if times else None

    def _wake_due(self) -> None:
        now = self._clock()
        for name, status in list(self._status.items()):
            if name in self._checks:
                continue  # its result arrives through the inbox
            spec = self._rollouts[name].spec
            wake = next_wakeup(spec, status)
            if wake is None or wake > now:
                continue
            if checks_due(spec, status, now):
                self._start_checks(name, status)
            else:
                self.handle(name, Tick(now))

    def _start_checks(self, name: str, status: RolloutStatus) -> None:
        spec = self._rollouts[name].spec
        analysis = spec.analysis
        canary = status.canary
        if analysis is None or canary is None:
            return
        url = analysis.prometheus or self._default_prometheus
        canary_version = canary.version
        if url is None:
            self.handle(name, ChecksCompleted((), self._clock(), canary_version))
            return
        provider = self._providers.get(url)
        if provider is None:
            provider = self._providers[url] = self._provider_factory(url)

        async def round_of_checks() -> None:
            try:
                results = await run_checks(
                    provider, analysis, cluster_name(name, canary_version), cluster_name(name, status.stable.version)
                )
                self.submit(name, ChecksCompleted(results, self._clock(), canary_version))
            finally:
                self._checks.pop(name, None)

        self._checks[name] = asyncio.create_task(round_of_checks(), name=f"checks-{name}")

    # ---- actions and callbacks -----------------------------------------------------------

    def _save(self, status: RolloutStatus, events: list[TransitionEvent]) -> None:
        if self._store is None:
            return
        rollout = self._rollouts[status.rollout]
        revision = self._applied_revision.get(status.rollout)
        self._store.save(status, rollout, events, revision)
        self._saved_revision[status.rollout] = revision

    def _publish(self, rollout: Rollout, traffic: DesiredTraffic) -> None:
        placement = _placement_of(rollout)
        self._placements[rollout.name] = placement
        self._director.set_rollout(rollout.name, placement, traffic)

    def _execute(self, rollout: Rollout, actions: Iterable[Action]) -> None:
        traffic = None
        for action in actions:
            if isinstance(action, SetTraffic):
                traffic = action.traffic
            elif isinstance(action, RecordEvent):
                self._record(action.event)
        if traffic is None and self._placements.get(rollout.name) != _placement_of(rollout):
            # The file moved the rollout (listener, hosts) without changing its traffic.
            traffic = self._director.desired(rollout.name) or desired_traffic(self._status[rollout.name])
        if traffic is not None:
            self._publish(rollout, traffic)

    def _record(self, event: TransitionEvent) -> None:
        history = self._history.setdefault(event.rollout, deque(maxlen=EVENT_HISTORY))
        history.append(event)
        checks = ", ".join(f"{c.name}={c.value}" for c in event.checks)
        log.info(
            "rollout %s: %s -> %s weight=%d reason=%s%s",
            event.rollout,
            event.from_phase.value if event.from_phase else "-",
            event.to_phase.value,
            event.weight,
            event.reason,
            f" checks: {checks}" if checks else "",
        )
        for listener in list(self._listeners):  # a listener may unsubscribe meanwhile
            listener(event)

    def _on_traffic_acked(self, name: str, traffic: DesiredTraffic) -> None:
        version = traffic.canary.version if traffic.canary else traffic.stable.version
        weight = traffic.canary_weight if traffic.canary else 100
        self.submit(name, WeightAcked(version, weight, self._clock()))

    def _on_nack(self, nack: RolloutNack) -> None:
        self.submit(nack.rollout, ProxyNacked(nack.node_id, nack.message))

    def _forget(self, name: str) -> None:
        self._orphaned.discard(name)
        if self._store is not None:
            self._store.delete(name)
        self._rollouts.pop(name, None)
        self._status.pop(name, None)
        self._placements.pop(name, None)
        task = self._checks.pop(name, None)
        if task is not None:
            task.cancel()
        self._director.remove_rollout(name)
