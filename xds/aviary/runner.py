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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


class RolloutRunner:
    def __init__(
        self,
        director: TrafficDirector,
        default_prometheus: str | None = None,
        provider_factory: ProviderFactory = PrometheusProvider,
        clock: Clock = time.monotonic,
    ) -> None:
        self._director = director
        self._default_prometheus = default_prometheus
        self._provider_factory = provider_factory
        self._providers: dict[str, MetricProvider] = {}
        self._clock = clock
        self._rollouts: dict[str, Rollout] = {}
        self._status: dict[str, RolloutStatus] = {}
        self._placements: dict[str, Placement] = {}
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

    # ---- inputs --------------------------------------------------------------------------

    def apply_policies(self, policy_set: PolicySet) -> None:
        """A new set of valid policy files: observe each spec, forget removed rollouts."""
        for name in set(self._rollouts) - set(policy_set.rollouts):
            log.info("rollout %s removed from policies", name)
            self._forget(name)
        for name, rollout in sorted(policy_set.rollouts.items()):
            previous = self._rollouts.get(name)
            self._rollouts[name] = rollout
            if previous is None or previous.spec != rollout.spec or name not in self._status:
                self.handle(name, SpecObserved(rollout.spec))

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
        self._status[name] = status
        self._execute(rollout, actions)
        return actions

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

    def _execute(self, rollout: Rollout, actions: Iterable[Action]) -> None:
        spec = rollout.spec
        placement = Placement(spec.listener, spec.hosts, spec.proxy_cluster)
        traffic = None
        for action in actions:
            if isinstance(action, SetTraffic):
                traffic = action.traffic
            elif isinstance(action, RecordEvent):
                self._record(action.event)
        if traffic is None and self._placements.get(rollout.name) != placement:
            # The file moved the rollout (listener, hosts) without changing its traffic.
            traffic = self._director.desired(rollout.name) or desired_traffic(self._status[rollout.name])
        if traffic is not None:
            self._placements[rollout.name] = placement
            self._director.set_rollout(rollout.name, placement, traffic)

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
        for listener in self._listeners:
            listener(event)

    def _on_traffic_acked(self, name: str, traffic: DesiredTraffic) -> None:
        version = traffic.canary.version if traffic.canary else traffic.stable.version
        weight = traffic.canary_weight if traffic.canary else 100
        self.submit(name, WeightAcked(version, weight, self._clock()))

    def _on_nack(self, nack: RolloutNack) -> None:
        self.submit(nack.rollout, ProxyNacked(nack.node_id, nack.message))

    def _forget(self, name: str) -> None:
        self._rollouts.pop(name, None)
        self._status.pop(name, None)
        self._placements.pop(name, None)
        task = self._checks.pop(name, None)
        if task is not None:
            task.cancel()
        self._director.remove_rollout(name)
