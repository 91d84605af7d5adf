"""The rollout engine: ``step(spec, status, event, now) -> (status, actions)``. Pure: no I/O, no clock.

Phases::

    Stable --(file names a new version, with a strategy)--> Progressing(step, weight) <--> Paused
    Progressing --(last step passed, or Promote)--> Promoting(100%) --(100% ACKed)--> Stable(new)
    Promoting --(100% ACKed, with afterPromotion)--> Guarding --(keep over, or Promote)--> Stable(new)
    Progressing | Paused | Promoting | Guarding --(failure / NACK / Abort)--> RolledBack(canary weight 0)

Rules (the contract the tests pin down):

- The file names the version that should run. First sight makes it stable at once. A different
  version starts a canary, or, without ``strategy``, becomes stable at once (the traffic layer
  does make-before-break). A newer version while a canary runs replaces the canary and restarts
  from the first step with fresh counters; the stable version named again drops the canary.
- A step's clock starts when every proxy ACKed its weight (``WeightAcked``), never before.
- A step ADVANCES when ``now >= step_started_at + duration`` (the interval, or a timed Pause's
  duration) AND, if analysis is configured and the canary has traffic, the latest check round taken
  in this step (at or after ``step_started_at``) PASSED, and no metric of ``analysis.judge`` in it
  is still short of its ``minSamples`` (rule ``min-samples``). So a step needs at least one passing round,
  a failure below failureLimit holds the step until a later round passes, and an inconclusive
  round never advances anything. One call advances at most one step.
- Rounds are counted as described in ``aviary.policy.analysis``: ``failed > failureLimit`` rolls
  back at once, mid-step; ``inconclusive > inconclusiveLimit`` (consecutive) rolls back or pauses.
  An inconclusive round that only waits for the judge's samples (``analysis.gathering``) is not
  counted. The judged metrics that failed are kept in ``judge_failed`` for the canary's run, and
  the first step's ACK sets ``canary_started_at`` (where the judge's samples begin).
- A ``{cohorts: [...]}`` step opens those cohorts: their requests reach the canary whatever the
  weight (it keeps the previous weight step's weight). Opened cohorts stay open until promotion or
  rollback; a step's clock starts when the plan's weight AND cohorts are ACKed.
- A ``{mirror: N}`` step copies N % of the weighted split's requests to the canary (users get the
  answers of the cluster the split chose). It keeps the previous weight step's weight and the
  opened cohorts; mirroring lasts that step only (the next step, promotion and rollback stop it).
  Checks apply in it (the copies are canary traffic); a step's clock starts when the plan's
  weight, cohorts AND mirror are ACKed.
- Rollback is one transition: canary weight 0, every cohort closed, mirroring stopped and the canary
  dropped from the plan. The failed version stays out until the file names another version or Retry.
- ``strategy.afterPromotion: {keep: D}`` guards a promotion. Once 100 % is ACKed the rollout is
  ``Guarding``: the promoted version serves everything while the previous one stays ``stable`` at
  weight 0 (its cluster stays warm in every proxy) and check rounds go on against the promoted
  version, counted as before (the run's counters carry on). A failure or NACK in the window is the
  usual rollback, a route change only ("reverted to v1 within afterPromotion: ..."). The window ends
  like a step: ``keep`` after the ACK of 100 % AND, with analysis, the latest round passed; then
  the promoted version is Stable and the previous one retired. Checks comparing with the stable
  version are left out during the window (the stable gets no traffic; ``guard_analysis``); with only
  those, the window ends on time alone. Inconclusive rounds over the limit revert with
  ``onInconclusive: rollback``; with ``pause`` they hold the window open until a round passes.
  Promote ends the window now, Abort reverts now, Pause / Resume / SetWeight are refused. A new
  version named during the window ends it first (the promoted one becomes stable) and starts its
  canary from there. Without ``afterPromotion`` the ACK of 100 % makes the canary stable at once.
- Every transition yields one ``RecordEvent``; ``SetTraffic`` is emitted exactly when the desired
  traffic differs from the previous status'.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from aviary.policy.analysis import (
    GATHERING,
    CheckOutcome,
    CheckResult,
    failure_limit_reason,
    gathering,
    inconclusive_limit_reason,
    round_outcome,
)
from aviary.policy.duration import format_duration
from aviary.policy.rollout_state import (
    Abort,
    Action,
    ChecksCompleted,
    Event,
    Hold,
    PauseRollout,
    Phase,
    Promote,
    ProxyNacked,
    RecordEvent,
    Rejected,
    Resume,
    Retry,
    RolloutStatus,
    SetTraffic,
    SetWeight,
    SpecObserved,
    Tick,
    TransitionEvent,
    WeightAcked,
)
from aviary.policy.schema import Analysis, CohortStep, MirrorStep, Pause, RolloutSpec
from aviary.traffic import Backend, Stickiness, TrafficPlan

__all__ = [
    "analysis_for",
    "checks_due",
    "guard_analysis",
    "guard_left",
    "next_wakeup",
    "step",
    "step_cohorts",
    "step_mirror",
    "step_weight",
    "traffic_plan",
]

_ACTIVE = (Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING, Phase.GUARDING)


def traffic_plan(spec: RolloutSpec, status: RolloutStatus) -> TrafficPlan:
    """The plan the traffic layer should publish. RolledBack and Stable carry no canary (and so no
    cohort, no mirror and no stickiness: one cluster needs no hash) at all. An opened cohort the file no longer
    defines is left out (the step restarts)."""
    defined = {cohort.name: cohort for cohort in spec.strategy.cohorts} if spec.strategy else {}
    cohorts = tuple(defined[name] for name in status.cohorts if name in defined) if status.canary else ()
    sticky = _stickiness(spec) if status.canary else None
    return TrafficPlan(stable=status.stable, canary=status.canary, canary_weight=status.weight, cohorts=cohorts,
                       stickiness=sticky, mirror=status.mirror if status.canary else 0)


def _stickiness(spec: RolloutSpec) -> Stickiness | None:
    wanted = spec.strategy.stickiness if spec.strategy else None
    if wanted is None:
        return None
    if wanted.cookie is not None:
        return Stickiness(cookie=wanted.cookie.name, ttl=wanted.cookie.ttl)
    return Stickiness(header=wanted.header)


def step_cohorts(spec: RolloutSpec, index: int) -> tuple[str, ...]:
    """The cohorts open at step ``index``: every cohorts step up to it, in order."""
    steps = spec.strategy.steps if spec.strategy else ()
    return tuple(name for candidate in steps[: index + 1] if isinstance(candidate, CohortStep)
                 for name in candidate.cohorts)


def step_mirror(spec: RolloutSpec, index: int) -> int:
    """The percent mirrored at step ``index``: a mirror step's own, 0 otherwise (mirroring does not
    carry over into later steps, see README "Mirroring")."""
    steps = spec.strategy.steps if spec.strategy else ()
    current = steps[index] if index < len(steps) else None
    return current.percent if isinstance(current, MirrorStep) else 0


def step_weight(spec: RolloutSpec, index: int) -> int:
    """The canary weight of step ``index``: a Pause keeps the previous weight step's (0 if none)."""
    steps = spec.strategy.steps if spec.strategy else ()
    for candidate in reversed(steps[: index + 1]):
        if isinstance(candidate, int):
            return candidate
    return 0


def guard_analysis(analysis: Analysis | None) -> Analysis | None:
    """The checks of the afterPromotion window: ``analysis`` without ``maxDecreaseFromStable``,
    without ``compare`` checks and without the ``judge`` (it compares with stable too).

    During the window the stable version gets no request, so a comparison with it would only ever
    be inconclusive (and, with enough rounds, revert a healthy version). A metric with min or max
    keeps those; one that only compares is left out. None when nothing is left to check.
    """
    if analysis is None:
        return None
    metrics = tuple(
        metric.model_copy(update={"max_decrease_from_stable": None}) if metric.max_decrease_from_stable is not None
        else metric
        for metric in analysis.metrics
        if metric.compare is None
        and (metric.max_decrease_from_stable is None or metric.min is not None or metric.max is not None)
    )
    return analysis.model_copy(update={"metrics": metrics, "judge": None}) if metrics else None


def analysis_for(spec: RolloutSpec, status: RolloutStatus) -> Analysis | None:
    """The checks a round runs for ``status``: the policy's, or during the window ``guard_analysis``'s."""
    return guard_analysis(spec.analysis) if status.phase is Phase.GUARDING else spec.analysis


def guard_left(spec: RolloutSpec, status: RolloutStatus, now: float) -> float | None:
    """Seconds left in the afterPromotion window (0 once over, while a round is awaited); None
    outside it or while its clock waits for every proxy's ACK of 100 % (after a restart)."""
    duration = _step_duration(spec, status) if status.phase is Phase.GUARDING else None
    if duration is None or status.step_started_at is None:
        return None
    return max(0.0, status.step_started_at + duration - now)


def checks_due(spec: RolloutSpec, status: RolloutStatus, now: float) -> bool:
    """True when the loop should run a check round now."""
    due = _next_check_at(spec, status)
    return due is not None and now >= due


def next_wakeup(spec: RolloutSpec, status: RolloutStatus) -> float | None:
    """When ``step`` should next be called with a Tick (or checks run), from the stored status alone.

    None: nothing is time-driven (waiting for an ACK, a command or a new file). Never in the past
    after a ``step`` call, except for an overdue check round, which the loop runs at once.
    """
    times = [t for t in (_next_check_at(spec, status), _step_ends_at(spec, status)) if t is not None]
    return min(times, default=None)


def step(spec: RolloutSpec, status: RolloutStatus | None, event: Event, now: float,
         *, rollout: str | None = None) -> tuple[RolloutStatus, list[Action]]:
    """Apply ``event`` to ``status`` under ``spec`` at time ``now``.

    ``status`` None is first sight; then ``rollout`` (the rollout's name) is required. The spec is
    reconciled on every call (not only on SpecObserved), then the event applied, then at most one
    step advanced.
    """
    if isinstance(event, SpecObserved) and event.spec != spec:
        raise ValueError("SpecObserved.spec differs from the spec passed to step()")
    m = _Machine(spec, now)
    if status is None:
        if rollout is None:
            raise ValueError("first sight of a rollout needs its name: step(..., rollout=NAME)")
        stable = Backend(spec.version, spec.endpoints)
        status = m.record(None, RolloutStatus(rollout, Phase.STABLE, stable),
                          f"first sight: version {spec.version} is stable")
        before: TrafficPlan | None = None
    else:
        if rollout is not None and rollout != status.rollout:
            raise ValueError(f"status belongs to {status.rollout!r}, not {rollout!r}")
        before = traffic_plan(spec, status)
    status = m.reconcile(status)
    status = m.apply(status, event)
    status = m.advance(status)
    actions: list[Action] = [RecordEvent(record) for record in m.records]
    actions.extend(m.rejected)
    after = traffic_plan(spec, status)
    if after != before:
        actions.append(SetTraffic(after))
    return status, actions


# ------------------------------------------------------------------------------------------ timing


def _canary_has_traffic(status: RolloutStatus) -> bool:
    """Whether the canary gets requests to judge: a weight, an opened cohort or mirrored copies."""
    return status.weight > 0 or bool(status.cohorts) or status.mirror > 0


def _checks_apply(spec: RolloutSpec, status: RolloutStatus) -> bool:
    if analysis_for(spec, status) is None or status.canary is None or status.step_started_at is None:
        return False
    if status.phase is Phase.GUARDING:
        return True
    return status.phase in (Phase.PROGRESSING, Phase.PAUSED) and _canary_has_traffic(status)


def _next_check_at(spec: RolloutSpec, status: RolloutStatus) -> float | None:
    if not _checks_apply(spec, status) or spec.analysis is None or status.step_started_at is None:
        return None
    last = status.step_checked_at if status.step_checked_at is not None else status.step_started_at
    return last + spec.analysis.check_every


def _step_duration(spec: RolloutSpec, status: RolloutStatus) -> float | None:
    """How long the current step (or the afterPromotion window) lasts once started; None if it does
    not end by itself."""
    if spec.strategy is None:
        return None
    if status.phase is Phase.GUARDING:
        return spec.strategy.after_promotion.keep if spec.strategy.after_promotion is not None else None
    if status.step_index >= len(spec.strategy.steps):
        return None
    current = spec.strategy.steps[status.step_index]
    if status.phase is Phase.PROGRESSING and isinstance(current, int | CohortStep | MirrorStep):
        return spec.strategy.interval
    if status.phase is Phase.PAUSED and status.hold is Hold.STEP and isinstance(current, Pause):
        return current.duration
    return None


def _evidence_ok(spec: RolloutSpec, status: RolloutStatus) -> bool:
    """No analysis or no canary traffic to judge, or the latest round of this step passed."""
    if status.phase is Phase.GUARDING:
        return guard_analysis(spec.analysis) is None or status.step_outcome is CheckOutcome.PASS
    if spec.analysis is None or not _canary_has_traffic(status):
        return True
    # A judged metric short of its minSamples holds the step, even if the score already passes.
    short = any(result.rule == GATHERING for result in status.last_checks)
    return status.step_outcome is CheckOutcome.PASS and not short


def _step_ends_at(spec: RolloutSpec, status: RolloutStatus) -> float | None:
    duration = _step_duration(spec, status)
    if duration is None or status.step_started_at is None or not _evidence_ok(spec, status):
        return None
    return status.step_started_at + duration


# ----------------------------------------------------------------------------------------- machine


@dataclass
class _Machine:
    """One ``step`` call: the spec, the clock and what the call produced so far."""

    spec: RolloutSpec
    now: float
    records: list[TransitionEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    # -- building blocks

    def record(self, before: RolloutStatus | None, after: RolloutStatus, reason: str,
               checks: tuple[CheckResult, ...] = ()) -> RolloutStatus:
        after = replace(after, reason=reason, updated_at=self.now)
        self.records.append(TransitionEvent(
            rollout=after.rollout, at=self.now, from_phase=before.phase if before else None,
            to_phase=after.phase, weight=after.weight, stable_version=after.stable.version,
            canary_version=after.canary.version if after.canary else None, step_index=after.step_index,
            reason=reason, checks=checks, cohorts=after.cohorts, mirror=after.mirror))
        return after

    def stable(self, status: RolloutStatus, stable: Backend, reason: str) -> RolloutStatus:
        # No check values carried over: they judged a canary that is gone (the events keep them).
        after = RolloutStatus(status.rollout, Phase.STABLE, stable)
        return self.record(status, after, reason)

    def start_canary(self, status: RolloutStatus, reason: str) -> RolloutStatus:
        canary = Backend(self.spec.version, self.spec.endpoints)
        if self.spec.strategy is None:
            reason = f"{reason}; no strategy: version {canary.version} is stable at once"
            return self.stable(status, canary, reason)
        fresh = RolloutStatus(status.rollout, Phase.PROGRESSING, status.stable, canary)
        return self.enter_step(status, fresh, 0, reason)

    def enter_step(self, before: RolloutStatus, status: RolloutStatus, index: int, reason: str,
                   checks: tuple[CheckResult, ...] = ()) -> RolloutStatus:
        """Go to step ``index`` (Promoting past the last); its clock starts now if the weight is ACKed."""
        steps = self.spec.strategy.steps if self.spec.strategy else ()
        if index >= len(steps):
            return self.promoting(before, status, reason, checks)
        weight, cohorts = step_weight(self.spec, index), step_cohorts(self.spec, index)
        mirror = step_mirror(self.spec, index)
        current = steps[index]
        if isinstance(current, Pause):
            until = (f"for {format_duration(current.duration)}" if current.duration
                     else "until Resume: waiting for `aviary resume` (next step) or `aviary promote`")
            phase, hold, paused = Phase.PAUSED, Hold.STEP, f"pause step {index + 1} {until}"
        else:
            phase, hold, paused = Phase.PROGRESSING, None, None
        acked = (status.acked_weight, status.acked_cohorts, status.acked_mirror) == (weight, cohorts, mirror)
        after = replace(status, phase=phase, hold=hold, paused_reason=paused, weight=weight, step_index=index,
                        cohorts=cohorts, mirror=mirror, step_started_at=self.now if acked else None,
                        step_outcome=None, step_checked_at=None, manual_weight=None)
        return self.record(before, after, reason, checks)

    def promoting(self, before: RolloutStatus, status: RolloutStatus, reason: str,
                  checks: tuple[CheckResult, ...] = ()) -> RolloutStatus:
        after = replace(status, phase=Phase.PROMOTING, hold=None, paused_reason=None, weight=100, cohorts=(),
                        mirror=0, step_started_at=None, step_outcome=None, step_checked_at=None, manual_weight=None)
        after = self.record(before, after, f"{reason}; promoting: 100% to {_canary(status).version}", checks)
        if after.acked_weight == 100:
            return self.promoted(after, self.now)
        return after

    def promoted(self, status: RolloutStatus, acked_at: float) -> RolloutStatus:
        """100 % is ACKed: stable now, or with afterPromotion the window starts (its clock at the ACK)."""
        version = _canary(status).version
        guard = self.spec.strategy.after_promotion if self.spec.strategy else None
        if guard is None:
            reason = f"100% to {version} ACKed by every proxy: {version} is stable"
            return self.stable(status, _canary(status), reason)
        after = replace(status, phase=Phase.GUARDING, step_started_at=acked_at, step_outcome=None,
                        step_checked_at=None)
        reason = (f"100% to {version} ACKed by every proxy: {version} promoted; {status.stable.version} "
                  f"kept warm for {format_duration(guard.keep)} (afterPromotion)")
        return self.record(status, after, reason)

    def guard_over(self, status: RolloutStatus, reason: str) -> RolloutStatus:
        """The window ends: the promoted version is stable, the previous one leaves the plan."""
        version = _canary(status).version
        return self.stable(status, _canary(status), f"{reason}: {version} is stable, {status.stable.version} retired")

    def roll_back(self, status: RolloutStatus, reason: str,
                  checks: tuple[CheckResult, ...] = ()) -> RolloutStatus:
        after = RolloutStatus(status.rollout, Phase.ROLLED_BACK, status.stable, counters=status.counters,
                              last_checks=status.last_checks, last_check_at=status.last_check_at,
                              failed_version=_canary(status).version)
        what = (f"reverted to {status.stable.version} within afterPromotion" if status.phase is Phase.GUARDING
                else f"rolled back {_canary(status).version}")
        return self.record(status, after, f"{what}: {reason}", checks)

    def reject(self, status: RolloutStatus, command: Event, reason: str) -> RolloutStatus:
        assert isinstance(command, PauseRollout | Resume | Promote | Abort | Retry | SetWeight)
        self.rejected.append(Rejected(command, reason))
        return status

    # -- the three phases of a call

    def reconcile(self, status: RolloutStatus) -> RolloutStatus:
        """Bring the status in line with the file: versions, endpoints, edited steps."""
        spec = self.spec
        version = spec.version
        named = Backend(version, spec.endpoints)
        if status.phase is Phase.ROLLED_BACK:
            if spec.version == status.failed_version:
                return status
            if spec.version == status.stable.version:
                return self.stable(status, named, f"file names stable version {spec.version}; "
                                                  f"failed version {status.failed_version} dropped")
            return self.start_canary(status, f"new version {version} replaces failed {status.failed_version}")
        if status.canary is None:
            if spec.version != status.stable.version:
                return self.start_canary(status, f"new version {version} (stable {status.stable.version})")
            if named != status.stable:
                return self.record(status, replace(status, stable=named), f"endpoints of {version} changed")
            return status
        if spec.version == status.stable.version:
            return self.stable(status, named, f"file names stable version {spec.version} again; "
                                              f"canary {status.canary.version} dropped")
        if spec.version != status.canary.version:
            if status.phase is Phase.GUARDING:  # the promoted version serves everything: start from it
                ended = self.guard_over(status, f"new version {version} during the afterPromotion window")
                return self.start_canary(ended, f"new version {version} (stable {ended.stable.version})")
            return self.start_canary(status, f"new version {version} replaces canary {status.canary.version}")
        if spec.strategy is None:
            return self.stable(status, named, f"strategy removed: version {spec.version} is stable at once")
        if named != status.canary:
            status = self.record(status, replace(status, canary=named), f"endpoints of {version} changed")
        if status.phase is Phase.GUARDING and spec.strategy.after_promotion is None:
            return self.guard_over(status, "afterPromotion removed from the file")
        if status.phase is Phase.PROGRESSING or status.hold is Hold.STEP:
            steps = spec.strategy.steps
            if status.step_index >= len(steps):
                return self.promoting(status, status, "strategy changed: no steps left")
            expected = Phase.PAUSED if isinstance(steps[status.step_index], Pause) else Phase.PROGRESSING
            wanted = (expected, step_weight(spec, status.step_index), step_cohorts(spec, status.step_index),
                      step_mirror(spec, status.step_index))
            if (status.phase, status.weight, status.cohorts, status.mirror) != wanted:
                return self.enter_step(status, status, status.step_index,
                                       f"strategy changed: step {status.step_index + 1} restarted")
        return status

    def apply(self, status: RolloutStatus, event: Event) -> RolloutStatus:
        if isinstance(event, SpecObserved | Tick):
            return status
        if isinstance(event, WeightAcked):
            return self.on_ack(status, event)
        if isinstance(event, ProxyNacked):
            if status.canary is None or event.version not in (None, status.canary.version):
                return status
            return self.roll_back(status, f"proxy {event.proxy} NACKed route: {event.message}")
        if isinstance(event, ChecksCompleted):
            return self.on_checks(status, event)
        return self.on_command(status, event)

    def advance(self, status: RolloutStatus) -> RolloutStatus:
        ends_at = _step_ends_at(self.spec, status)
        if ends_at is None or self.now < ends_at:
            return status
        index = status.step_index
        if status.phase is Phase.GUARDING:
            keep = format_duration(ends_at - status.step_started_at) if status.step_started_at is not None else "-"
            passed = " and the latest check round passed" if guard_analysis(self.spec.analysis) else ""
            return self.guard_over(status, f"afterPromotion window ({keep}) over{passed}")
        if status.phase is Phase.PAUSED:
            reason = f"pause step {index + 1} over"
        else:
            interval = format_duration(self.spec.strategy.interval) if self.spec.strategy else "-"
            what = f"{status.weight}%, mirroring {status.mirror}%" if status.mirror else f"{status.weight}%"
            reason = f"step {index + 1} ({what}) passed: {interval} elapsed"
            if self.spec.analysis is not None:
                reason += " and the latest check round passed"
        return self.enter_step(status, status, index + 1, reason, status.last_checks)

    # -- events

    def on_ack(self, status: RolloutStatus, event: WeightAcked) -> RolloutStatus:
        if status.canary is None or event.version != status.canary.version:
            return status
        status = replace(status, acked_weight=event.weight, acked_cohorts=event.cohorts, acked_mirror=event.mirror)
        acked = (event.weight, event.cohorts, event.mirror)
        if acked != (status.weight, status.cohorts, status.mirror) or status.step_started_at is not None:
            return status
        if status.phase is Phase.PROMOTING:
            return self.promoted(status, min(event.at, self.now))
        if status.phase is Phase.GUARDING:  # after a restart: the window's clock runs again
            started = replace(status, step_started_at=min(event.at, self.now))
            reason = (f"100% to {event.version} ACKed by every proxy: afterPromotion window goes on, "
                      f"{status.stable.version} kept warm")
            return self.record(status, started, reason)
        at = min(event.at, self.now)
        started = replace(status, step_started_at=at,
                          canary_started_at=status.canary_started_at if status.canary_started_at is not None else at)
        what = f"step {status.step_index + 1}" if status.manual_weight is None else "manual weight"
        opened = f" and cohorts {', '.join(event.cohorts)}" if event.cohorts else ""
        copied = f", mirroring {event.mirror}%," if event.mirror else ""
        reason = f"{event.weight}%{opened}{copied} to {event.version} ACKed by every proxy: {what} started"
        return self.record(status, started, reason)

    def on_checks(self, status: RolloutStatus, event: ChecksCompleted) -> RolloutStatus:
        analysis = analysis_for(self.spec, status)
        if (analysis is None or not _checks_apply(self.spec, status) or status.step_started_at is None
                or event.at < status.step_started_at
                or event.version not in (None, _canary(status).version)):
            return status
        outcome = round_outcome(event.results)
        # A judge still short of samples is measuring, not silent: the step waits, nothing is counted.
        counters = status.counters if gathering(event.results) else status.counters.record(outcome)
        failed = status.judge_failed + tuple(
            (result.name, result.reason) for result in event.results
            if result.kind == "judge" and result.rule == "beyond-allowed"
            and result.name not in {name for name, _ in status.judge_failed})
        status = replace(status, counters=counters, step_outcome=outcome, step_checked_at=event.at,
                         last_checks=event.results, last_check_at=event.at, judge_failed=failed)
        if outcome is CheckOutcome.FAIL and counters.over_failure_limit(analysis):
            return self.roll_back(status, failure_limit_reason(counters, analysis), event.results)
        if outcome is CheckOutcome.INCONCLUSIVE and counters.over_inconclusive_limit(analysis):
            reason = inconclusive_limit_reason(counters, analysis)
            if analysis.on_inconclusive == "rollback":
                return self.roll_back(status, reason, event.results)
            if status.phase is Phase.PROGRESSING or status.hold is Hold.STEP:
                paused = replace(status, phase=Phase.PAUSED, hold=Hold.INCONCLUSIVE,
                                 paused_reason=f"{reason}; waiting for Resume")
                return self.record(status, paused, f"paused: {reason}", event.results)
            if status.phase is Phase.GUARDING and counters.inconclusive == analysis.inconclusive_limit + 1:
                held = (f"afterPromotion window held open: {reason}; it ends after a passing round "
                        f"(promote ends it now, abort reverts to {status.stable.version})")
                return self.record(status, status, held, event.results)
        return status

    def on_command(self, status: RolloutStatus, command: Event) -> RolloutStatus:
        phase = status.phase
        if isinstance(command, Retry):
            if phase is not Phase.ROLLED_BACK or status.failed_version != self.spec.version:
                return self.reject(status, command, f"nothing to retry: rollout is {phase.value}")
            return self.start_canary(status, f"retry of {self.spec.version} by {command.by}")
        if status.canary is None:
            return self.reject(status, command, f"no canary: rollout is {phase.value}")
        if isinstance(command, Abort):
            return self.roll_back(status, f"aborted by {command.by}")
        if phase is Phase.GUARDING:
            if isinstance(command, Promote):
                return self.guard_over(status, f"afterPromotion window ended by {command.by}")
            return self.reject(status, command, f"{_canary(status).version} is promoted and "
                                                f"{status.stable.version} kept warm: promote ends the window now, "
                                                f"abort reverts to {status.stable.version}")
        if phase is Phase.PROMOTING:
            return self.reject(status, command, "already promoting")
        if isinstance(command, Promote):
            return self.promoting(status, status, f"promoted by {command.by}")
        if isinstance(command, SetWeight):
            weight = command.weight
            after = replace(status, phase=Phase.PAUSED, hold=Hold.MANUAL_WEIGHT, weight=weight,
                            manual_weight=weight, paused_reason=f"manual weight {weight}% until Resume",
                            step_started_at=self.now if (status.acked_weight, status.acked_cohorts, status.acked_mirror)
                            == (weight, status.cohorts, status.mirror) else None,
                            step_outcome=None, step_checked_at=None)
            return self.record(status, after, f"weight set to {weight}% by {command.by}; automation paused")
        if isinstance(command, PauseRollout):
            if phase is Phase.PAUSED and status.hold is not Hold.STEP:
                return self.reject(status, command, f"already paused: {status.paused_reason}")
            after = replace(status, phase=Phase.PAUSED, hold=Hold.ADMIN,
                            paused_reason=f"paused by {command.by} until Resume")
            return self.record(status, after, f"paused by {command.by}")
        assert isinstance(command, Resume)
        if phase is not Phase.PAUSED:
            return self.reject(status, command, f"not paused: rollout is {phase.value}")
        steps = self.spec.strategy.steps if self.spec.strategy else ()
        resumed = replace(status, counters=status.counters.without_inconclusive())
        index = status.step_index
        by = f"resumed by {command.by}"
        if index < len(steps) and isinstance(steps[index], Pause):
            return self.enter_step(status, resumed, index + 1, f"{by}: pause step {index + 1} over")
        return self.enter_step(status, resumed, index, f"{by}: step {index + 1} restarted")


def _canary(status: RolloutStatus) -> Backend:
    if status.canary is None:
        raise AssertionError(f"rollout {status.rollout} has no canary in phase {status.phase.value}")
    return status.canary
