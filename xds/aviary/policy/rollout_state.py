"""The values the rollout machine reads and writes: status, events in, actions out.

Everything here is a frozen dataclass, so a status can be saved, compared and handed to the admin
API without copying, and a restart resumes from the saved status alone (no timers in memory).
The machine itself lives in ``rollout_machine``; ``rollout`` re-exports both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from aviary.policy.analysis import CheckOutcome, CheckResult, Counters
from aviary.policy.schema import RolloutSpec
from aviary.traffic import Backend, TrafficPlan

__all__ = [
    "Abort",
    "Action",
    "AdminCommand",
    "CheckRound",
    "ChecksCompleted",
    "Event",
    "Hold",
    "PauseRollout",
    "Phase",
    "Promote",
    "ProxyNacked",
    "RecordEvent",
    "Rejected",
    "Resume",
    "Retry",
    "RolloutStatus",
    "SetTraffic",
    "SetWeight",
    "SpecObserved",
    "Tick",
    "TransitionEvent",
    "WeightAcked",
]


class Phase(enum.Enum):
    STABLE = "Stable"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTING = "Promoting"
    GUARDING = "Guarding"  # promoted, the previous version kept warm for strategy.afterPromotion.keep
    ROLLED_BACK = "RolledBack"


class Hold(enum.Enum):
    """Why a PAUSED rollout waits, which decides what Resume does."""

    STEP = "pause step"  # a Pause step of the strategy (timed ones resume by themselves)
    ADMIN = "admin"  # a Pause command
    INCONCLUSIVE = "inconclusive"  # onInconclusive: pause
    MANUAL_WEIGHT = "manual weight"  # a SetWeight command


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """Everything the machine knows about one rollout; the only state it has.

    ``weight`` is the canary weight the machine wants (0..100). ``step_started_at`` is when every
    proxy ACKed that weight: the step's clock and its analysis start there, and it is None while the
    ACK is awaited. ``acked_weight`` is the canary weight every proxy last ACKed (None: not yet, for
    this canary). ``cohorts`` are the cohorts opened so far (their requests reach the canary whatever
    the weight; they stay open until promotion or rollback), ``acked_cohorts`` those of the plan every
    proxy last ACKed. ``mirror`` is the percent of the weighted split's requests copied to the canary
    (a mirror step's own, 0 in any other step), ``acked_mirror`` that of the plan every proxy last
    ACKed (0 until an ACK, like ``acked_cohorts``): a step starts when the weight, the cohorts and
    the mirror are all ACKed.
    ``step_outcome`` / ``step_checked_at`` describe the latest check round taken in the current step
    (None: none yet); ``last_checks`` keeps the latest round of the run for display.

    While ``Guarding`` (the afterPromotion window), ``stable`` is still the previous version and
    ``canary`` the promoted one at weight 100, so the previous version's cluster stays published and
    a revert is an ordinary rollback; the step fields then describe the window (its clock starts when
    100 % is ACKed, its latest round decides whether it may end). No field of its own, so a state
    file from before the window existed loads unchanged.
    """

    rollout: str
    phase: Phase
    stable: Backend
    canary: Backend | None = None
    weight: int = 0
    step_index: int = 0
    step_started_at: float | None = None
    acked_weight: int | None = None
    cohorts: tuple[str, ...] = ()
    acked_cohorts: tuple[str, ...] = ()
    mirror: int = 0
    acked_mirror: int = 0
    counters: Counters = field(default_factory=Counters)
    step_outcome: CheckOutcome | None = None
    step_checked_at: float | None = None
    last_checks: tuple[CheckResult, ...] = ()
    last_check_at: float | None = None
    failed_version: str | None = None
    hold: Hold | None = None
    paused_reason: str | None = None
    manual_weight: int | None = None
    reason: str = ""
    updated_at: float = 0.0
    canary_started_at: float | None = None
    """When this canary's first step started (its first ACK): the judge's samples reach back there."""
    judge_failed: tuple[tuple[str, str], ...] = ()
    """Judged metrics (``analysis.judge``) this canary has failed, with the reason then: a metric
    that failed stays failed for the run (``aviary.policy.judge.JudgeState``). Reset with the
    counters, by a new canary or Retry."""

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 100:
            raise ValueError(f"weight must be within 0..100, got {self.weight}")
        if (self.canary is None) != (self.phase in (Phase.STABLE, Phase.ROLLED_BACK)):
            needs = "needs" if self.canary is None else "has no"
            raise ValueError(f"phase {self.phase.value} {needs} canary")
        if not 0 <= self.mirror <= 100:
            raise ValueError(f"mirror must be within 0..100, got {self.mirror}")
        if self.canary is None and (self.weight != 0 or self.cohorts or self.mirror):
            raise ValueError("a weight, an opened cohort or a mirror needs a canary")
        if (self.phase is Phase.PAUSED) != (self.hold is not None):
            raise ValueError("hold is set exactly when the phase is Paused")
        if self.phase is Phase.GUARDING and (self.weight != 100 or self.cohorts):
            raise ValueError("phase Guarding sends every request to the promoted version (weight 100, no cohort)")


# ------------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class SpecObserved:
    """The policy file was (re)read. ``spec`` must be the spec passed to ``step``."""

    spec: RolloutSpec


@dataclass(frozen=True, slots=True)
class WeightAcked:
    """Every proxy serving the rollout ACKed the route of a plan giving ``version`` ``weight`` percent,
    the requests of the opened ``cohorts`` and copies of ``mirror`` percent of the split, at ``at``."""

    version: str
    weight: int
    at: float
    cohorts: tuple[str, ...] = ()
    mirror: int = 0


@dataclass(frozen=True, slots=True)
class ProxyNacked:
    """A proxy rejected the rollout's route; ``version`` is the canary it named (None: unknown)."""

    proxy: str
    message: str
    version: str | None = None


@dataclass(frozen=True, slots=True)
class ChecksCompleted:
    """One check round; ``at`` is when the round was taken (the loop reads the clock before
    querying), ``version`` the canary it measured (None: not checked against the current canary)."""

    results: tuple[CheckResult, ...]
    at: float
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. The machine's clock is ``step``'s ``now``; ``now`` here is informational."""

    now: float


@dataclass(frozen=True, slots=True)
class PauseRollout:
    """Admin: stop automation where it is (traffic stays as it is)."""

    by: str = "admin"


@dataclass(frozen=True, slots=True)
class Resume:
    """Admin: continue automation. Past a Pause step it advances; otherwise it restarts the step."""

    by: str = "admin"


@dataclass(frozen=True, slots=True)
class Promote:
    """Admin: skip the remaining steps, send 100% to the canary and make it stable once ACKed (with
    afterPromotion: the window starts then); during the window, end it now."""

    by: str = "admin"


@dataclass(frozen=True, slots=True)
class Abort:
    """Admin: roll back now (one action, canary weight 0); during the afterPromotion window, revert."""

    by: str = "admin"


@dataclass(frozen=True, slots=True)
class Retry:
    """Admin: start the rolled-back version again from the first step."""

    by: str = "admin"


@dataclass(frozen=True, slots=True)
class SetWeight:
    """Admin: set the canary weight by hand; automation pauses until Resume."""

    weight: int
    by: str = "admin"

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 100:
            raise ValueError(f"weight must be within 0..100, got {self.weight}")


AdminCommand = PauseRollout | Resume | Promote | Abort | Retry | SetWeight
Event = SpecObserved | WeightAcked | ProxyNacked | ChecksCompleted | Tick | AdminCommand


# ----------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """A record of one transition, kept by the caller (history, logs, admin API)."""

    rollout: str
    at: float
    from_phase: Phase | None
    to_phase: Phase
    weight: int
    stable_version: str
    canary_version: str | None
    step_index: int
    reason: str
    checks: tuple[CheckResult, ...] = ()
    cohorts: tuple[str, ...] = ()  # open after the transition
    mirror: int = 0  # percent of the split copied to the canary after the transition

    def __str__(self) -> str:
        source = self.from_phase.value if self.from_phase else "-"
        canary = (f" {traffic_text(self.canary_version, self.weight, self.stable_version, self.cohorts, self.mirror)}"
                  if self.canary_version else "")
        return f"{self.rollout}: {source} -> {self.to_phase.value}{canary}: {self.reason}"


def traffic_text(canary_version: str | None, weight: int, stable_version: str, cohorts: Sequence[str] = (),
                 mirror: int = 0) -> str:
    """How a transition left traffic, for logs, events and the CLI: ``canary v2 at 20% and cohorts
    internal``, ``canary v2 at 0%, mirroring 100%``, or ``all traffic to v2`` (never "weight 0 %"
    for a rollout without a canary)."""
    if not canary_version:
        return f"all traffic to {stable_version}"
    opened = f" and cohorts {', '.join(cohorts)}" if cohorts else ""
    copied = f", mirroring {mirror}%" if mirror else ""
    return f"canary {canary_version} at {weight}%{opened}{copied}"


@dataclass(frozen=True, slots=True)
class SetTraffic:
    """Publish this traffic plan (emitted only when it differs from the previous status')."""

    traffic: TrafficPlan


@dataclass(frozen=True, slots=True)
class RecordEvent:
    event: TransitionEvent


@dataclass(frozen=True, slots=True)
class Rejected:
    """An admin command that does not apply to the rollout as it is; nothing changed."""

    command: AdminCommand
    reason: str


Action = SetTraffic | RecordEvent | Rejected


@dataclass(frozen=True, slots=True)
class CheckRound:
    """One check round as the engine took it, for ``aviary explain``: when, at which step and
    weight, every check's result, the round's outcome and the transitions it caused (reasons)."""

    rollout: str
    at: float
    canary_version: str
    step_index: int
    weight: int
    outcome: CheckOutcome
    checks: tuple[CheckResult, ...]
    transitions: tuple[str, ...] = ()
