"""Run one policy over a recording with the engine of ``aviary serve``, on a simulated clock.

Nothing here decides: the rollout runner (``aviary.runner``), its state machine, check kinds and
judge are the ones ``aviary serve`` runs. What changes is around them:

- the clock is simulated: it jumps from one wake-up of the engine to the next (a check round due,
  a step's interval over, an ACK arriving), so an hour of traffic replays in seconds;
- Prometheus is the recording (``RecordedProvider``), answering as of the simulated time;
- the proxies are the traffic director with none connected, which ACKs every publish at once,
  or ``ack_delay`` later (``_DelayedAcks``), as a fleet of proxies would.

The rollout starts as it does live: the stable version is in place (first sight: Stable), then
the policy naming the canary arrives at ``start``. It ends when the canary is promoted (Stable
on the canary's version), rolled back, or the recording ends first.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import AckListener, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.metrics.planned_queries import planned_queries
from aviary.metrics.recording import RecordedProvider, Recording, utc_text
from aviary.policy.rollout_state import CheckRound, Phase, RolloutStatus, TransitionEvent
from aviary.policy.schema import PolicySet, Rollout
from aviary.runner import RolloutRunner
from aviary.traffic import TrafficPlan

__all__ = ["Outcome", "SimulationError", "SimulationResult", "simulate", "with_version"]

_STUCK_LIMIT = 10_000  # passes without the clock moving: the engine is not making progress


class SimulationError(ValueError):
    """The policy and the recording do not fit together (the message says how); nothing was run."""


class Outcome(enum.Enum):
    """How the simulated rollout ended, and the exit status of ``aviary simulate``."""

    PROMOTED = 0
    ROLLED_BACK = 3
    RUNNING = 4  # still progressing, or paused, when the recording ended


@dataclass(frozen=True, slots=True)
class SimulationResult:
    rollout: str
    canary: str
    stable: str
    start: float
    end: float
    """Simulated time when it stopped: the decision, or the end of the recording."""
    outcome: Outcome
    phase: Phase
    weight: int
    rounds: tuple[CheckRound, ...]
    transitions: tuple[TransitionEvent, ...]
    notes: tuple[str, ...]

    @property
    def decided_after(self) -> float | None:
        """Seconds from the start to the promotion or rollback; None while still running."""
        return None if self.outcome is Outcome.RUNNING else self.end - self.start


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _DelayedAcks(TrafficDirector):
    """The director with no proxy connected, whose ACKs reach the engine ``delay`` seconds later."""

    def __init__(self, clock: _Clock, delay: float) -> None:
        super().__init__(SnapshotCache(), ProxyStatus())
        self._clock = clock
        self._delay = delay
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def on_traffic_acked(self, listener: AckListener) -> None:
        if self._delay <= 0:
            super().on_traffic_acked(listener)
            return

        def later(name: str, traffic: TrafficPlan) -> None:
            self.pending.append((self._clock() + self._delay, lambda: listener(name, traffic)))

        super().on_traffic_acked(later)

    def next_ack_at(self) -> float | None:
        return min((at for at, _ in self.pending), default=None)

    def deliver_due(self) -> bool:
        due = [deliver for at, deliver in self.pending if at <= self._clock()]
        self.pending = [(at, deliver) for at, deliver in self.pending if at > self._clock()]
        for deliver in due:
            deliver()
        return bool(due)


def with_version(rollout: Rollout, version: str) -> Rollout:
    """``rollout`` naming ``version``: the recording's canary or stable in place of the file's."""
    return rollout.model_copy(update={"spec": rollout.spec.model_copy(update={"version": version})})


def check_fits(rollout: Rollout, recording: Recording) -> None:
    """SimulationError unless the recording holds every query the policy can ask, for its versions."""
    prov = recording.provenance
    if rollout.spec.analysis is None:
        raise SimulationError(f"policy {rollout.name}: spec.analysis is missing: without checks there is "
                              "nothing to replay (every step would pass on time)")
    if rollout.name != prov.rollout:
        raise SimulationError(f"policy is rollout {rollout.name!r}, the recording was made for {prov.rollout!r} "
                              f"(from {prov.policy}): its queries name other clusters")
    missing = [query for query in planned_queries(rollout.name, rollout.spec, prov.canary, prov.stable)
               if query.query not in recording.series]
    if missing:
        lines = "; ".join(f"{', '.join(q.uses)}: {q.query}" for q in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SimulationError(
            f"the recording ({recording.covers()}, from {prov.policy}) holds no series for {len(missing)} "
            f"quer{'y' if len(missing) == 1 else 'ies'} this policy asks{more}: {lines}; "
            "record again with this policy (aviary record)")


async def simulate(rollout: Rollout, policy_file: str, recording: Recording, *, start: float | None = None,
                   ack_delay: float = 0.0) -> SimulationResult:
    """Replay ``rollout`` (its canary and stable versions taken from the recording) from ``start``
    (default: where the recording was asked to begin) until a decision or the recording's end."""
    prov = recording.provenance
    begin = prov.simulate_from if start is None else start
    if not prov.start <= begin < prov.end:
        raise SimulationError(f"start {utc_text(begin)} is outside the recording ({recording.covers()})")
    check_fits(rollout, recording)
    clock = _Clock(begin)
    provider = RecordedProvider(recording, clock)
    director = _DelayedAcks(clock, ack_delay)
    runner = RolloutRunner(director, default_prometheus=prov.prometheus, provider_factory=lambda _url: provider,
                           clock=clock, web_factory=lambda: provider, round_history=1 << 30)
    transitions: list[TransitionEvent] = []
    runner.on_transition(transitions.append)
    name = rollout.name
    for version in (prov.stable, prov.canary):  # the stable version in place, then the canary's policy
        runner.apply_policies(PolicySet({name: with_version(rollout, version)}, {name: policy_file}))
        runner.process_queued()

    stuck = 0
    while True:
        runner.process_queued()
        status = runner.status(name)
        if status is not None and _decided(status, prov.canary):
            break
        runner.wake_due()
        moved = await runner.rounds_finished() or director.deliver_due()
        if moved:
            continue
        runner.process_queued()
        upcoming = [t for t in (runner.next_wakeup_at(), director.next_ack_at()) if t is not None]
        if not upcoming or min(upcoming) > prov.end:
            if upcoming:  # the next wake-up is past the data: the run ends with it
                clock.now = max(clock.now, prov.end)
            break
        stuck = stuck + 1 if min(upcoming) <= clock.now else 0
        if stuck > _STUCK_LIMIT:
            raise SimulationError(f"the engine makes no progress at {utc_text(clock.now)} (a bug: please report it)")
        clock.now = max(clock.now, min(upcoming))
    status = runner.status(name)
    assert status is not None
    outcome = Outcome.RUNNING
    if status.phase is Phase.ROLLED_BACK:
        outcome = Outcome.ROLLED_BACK
    elif _decided(status, prov.canary):
        outcome = Outcome.PROMOTED
    return SimulationResult(name, prov.canary, prov.stable, begin, clock.now, outcome, status.phase, status.weight,
                            tuple(runner.rounds(name)), tuple(transitions), tuple(provider.notes))


def _decided(status: RolloutStatus, canary: str) -> bool:
    return status.phase is Phase.ROLLED_BACK or (status.phase is Phase.STABLE and status.stable.version == canary)
