"""The rollout engine: every phase transition and admin command, then properties over random runs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviary.policy.analysis import CheckOutcome, CheckResult, Counters, Thresholds, round_outcome
from aviary.policy.rollout import (
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
    checks_due,
    next_wakeup,
    step,
    step_cohorts,
    step_weight,
    traffic_plan,
)
from aviary.policy.schema import RolloutSpec
from aviary.traffic import Backend, TrafficPlan

PASS, FAIL, INCONCLUSIVE = CheckOutcome.PASS, CheckOutcome.FAIL, CheckOutcome.INCONCLUSIVE
ANALYSIS: dict[str, Any] = {
    "checkEvery": "5s", "window": "30s", "failureLimit": 1, "inconclusiveLimit": 2,
    "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}],
}
_DEFAULT: Any = object()
HOSTS = {"v1": 1, "v2": 2, "v3": 3}


def make_spec(version: str = "v1", steps: list[Any] | None = None, interval: str = "30s",
              analysis: Any = _DEFAULT, strategy: bool = True, port: int = 8080,
              cohorts: list[Any] | None = None, keep: str | None = None) -> RolloutSpec:
    doc: dict[str, Any] = {
        "listener": {"port": 10000}, "hosts": ["shop.example.com"], "version": version,
        "endpoints": [f"10.0.0.{HOSTS.get(version, 9)}:{port}"],
    }
    if strategy:
        doc["strategy"] = {"steps": [10, 50] if steps is None else steps, "interval": interval}
        if cohorts:
            doc["strategy"]["cohorts"] = cohorts
        if keep:
            doc["strategy"]["afterPromotion"] = {"keep": keep}
    if analysis is _DEFAULT:
        doc["analysis"] = ANALYSIS
    elif analysis is not None:
        doc["analysis"] = analysis
    return RolloutSpec.model_validate(doc)


def backend(spec: RolloutSpec) -> Backend:
    return Backend(spec.version, spec.endpoints)


def results(*outcomes: CheckOutcome) -> tuple[CheckResult, ...]:
    return tuple(CheckResult(f"m{i}", outcome, 1.0, None, Thresholds(min=0.0), outcome.value)
                 for i, outcome in enumerate(outcomes))


def records(actions: list[Action]) -> list[TransitionEvent]:
    return [a.event for a in actions if isinstance(a, RecordEvent)]


def traffic(actions: list[Action]) -> list[TrafficPlan]:
    return [a.traffic for a in actions if isinstance(a, SetTraffic)]


def rejected(actions: list[Action]) -> list[Rejected]:
    return [a for a in actions if isinstance(a, Rejected)]


class Run:
    """Drives one rollout through events, keeping the clock and the latest status."""

    def __init__(self, spec: RolloutSpec, now: float = 1000.0, shape: dict[str, Any] | None = None) -> None:
        self.spec, self.now, self.shape = spec, now, shape or {}
        self.status, self.actions = step(spec, None, SpecObserved(spec), now, rollout="shop")

    def send(self, event: Event) -> RolloutStatus:
        self.status, self.actions = step(self.spec, self.status, event, self.now)
        return self.status

    def observe(self, spec: RolloutSpec) -> RolloutStatus:
        self.spec = spec
        return self.send(SpecObserved(spec))

    def tick(self, seconds: float) -> RolloutStatus:
        self.now += seconds
        return self.send(Tick(self.now))

    def ack(self) -> RolloutStatus:
        assert self.status.canary is not None
        return self.send(WeightAcked(self.status.canary.version, self.status.weight, self.now))

    def checks(self, *outcomes: CheckOutcome) -> RolloutStatus:
        return self.send(ChecksCompleted(results(*outcomes), self.now))

    def canary_running(self, version: str = "v2") -> RolloutStatus:
        """v1 stable, canary ``version`` started and its first weight ACKed."""
        self.observe(make_spec(version, **self.shape))
        return self.ack()


def run_with(**shape: Any) -> Run:
    return Run(make_spec("v1", **shape), shape=shape)


# ----------------------------------------------------------------------------- first sight, no canary


def test_first_sight_makes_the_version_stable() -> None:
    run = Run(make_spec("v1"))
    assert run.status.phase is Phase.STABLE
    assert run.status.stable == backend(make_spec("v1"))
    assert traffic(run.actions) == [TrafficPlan(stable=backend(make_spec("v1")))]
    [record] = records(run.actions)
    assert (record.rollout, record.from_phase, record.to_phase) == ("shop", None, Phase.STABLE)
    assert record.reason == "first sight: version v1 is stable"


def test_first_sight_needs_the_rollout_name() -> None:
    spec = make_spec("v1")
    with pytest.raises(ValueError, match="name"):
        step(spec, None, SpecObserved(spec), 0.0)


def test_spec_observed_must_carry_the_spec_given_to_step() -> None:
    run = Run(make_spec("v1"))
    with pytest.raises(ValueError, match="differs"):
        step(make_spec("v1"), run.status, SpecObserved(make_spec("v2")), run.now)


def test_same_file_again_changes_nothing() -> None:
    run = Run(make_spec("v1"))
    before = run.status
    assert run.observe(make_spec("v1")) == before
    assert run.actions == []


def test_without_strategy_a_new_version_is_stable_at_once() -> None:
    run = Run(make_spec("v1", strategy=False))
    status = run.observe(make_spec("v2", strategy=False))
    assert (status.phase, status.stable.version, status.canary) == (Phase.STABLE, "v2", None)
    assert traffic(run.actions) == [TrafficPlan(stable=backend(make_spec("v2")))]
    assert "no strategy" in records(run.actions)[0].reason


def test_stable_endpoint_change_republishes_traffic() -> None:
    run = Run(make_spec("v1"))
    status = run.observe(make_spec("v1", port=9090))
    assert status.phase is Phase.STABLE
    assert traffic(run.actions) == [TrafficPlan(stable=backend(make_spec("v1", port=9090)))]
    assert records(run.actions)[0].reason == "endpoints of v1 changed"


# ---------------------------------------------------------------------------- progressing and ACKs


def test_new_version_starts_a_canary_at_the_first_step_waiting_for_the_ack() -> None:
    run = Run(make_spec("v1"))
    status = run.observe(make_spec("v2"))
    assert (status.phase, status.step_index, status.weight) == (Phase.PROGRESSING, 0, 10)
    assert status.canary == backend(make_spec("v2"))
    assert status.step_started_at is None
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 10)]
    assert records(run.actions)[0].reason == "new version v2 (stable v1)"
    # Nothing is time-driven until the ACK: no wake-up, no checks, no advance however long we wait.
    assert next_wakeup(run.spec, status) is None
    assert run.tick(3600).step_started_at is None
    assert not checks_due(run.spec, run.status, run.now)


def test_the_step_clock_starts_at_the_ack_of_that_weight() -> None:
    run = Run(make_spec("v1"))
    run.observe(make_spec("v2"))
    assert run.send(WeightAcked("v2", 50, run.now)).step_started_at is None  # another weight
    assert run.send(WeightAcked("v9", 10, run.now)).step_started_at is None  # another version
    run.now += 2
    status = run.send(WeightAcked("v2", 10, run.now - 1))
    assert status.step_started_at == run.now - 1
    assert status.acked_weight == 10
    assert records(run.actions)[0].reason == "10% to v2 ACKed by every proxy: step 1 started"
    assert traffic(run.actions) == []  # the split did not change
    # A second ACK of the same weight does not restart the clock.
    run.now += 3
    assert run.ack().step_started_at == run.now - 4


def test_checks_are_due_every_check_every_after_the_step_started() -> None:
    run = run_with()
    status = run.canary_running()
    started = status.step_started_at
    assert started is not None
    assert next_wakeup(run.spec, status) == started + 5
    assert not checks_due(run.spec, status, started + 4.9)
    assert checks_due(run.spec, status, started + 5)
    run.now = started + 5
    status = run.checks(PASS)
    assert status.step_checked_at == started + 5
    # Next round at +10; the step ends at +30 (it may, since the latest round passed).
    assert next_wakeup(run.spec, status) == started + 10
    assert not checks_due(run.spec, status, started + 9)


def test_a_step_advances_after_its_interval_when_the_latest_round_passed() -> None:
    run = run_with()
    run.canary_running()
    run.now += 5
    run.checks(PASS)
    assert run.tick(24).step_index == 0  # 29 s < 30 s interval
    status = run.tick(1)
    assert (status.phase, status.step_index, status.weight, status.step_started_at) == \
        (Phase.PROGRESSING, 1, 50, None)
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 50)]
    [record] = records(run.actions)
    assert record.reason == "step 1 (10%) passed: 30s elapsed and the latest check round passed"
    assert (record.from_phase, record.to_phase, record.weight, record.step_index) == \
        (Phase.PROGRESSING, Phase.PROGRESSING, 50, 1)
    assert record.checks == results(PASS)


def test_no_round_no_advance() -> None:
    run = run_with()
    run.canary_running()
    assert run.tick(600).step_index == 0


def test_an_inconclusive_latest_round_never_advances() -> None:
    run = run_with()
    run.canary_running()
    run.now += 5
    run.checks(PASS)
    run.now += 30
    status = run.checks(INCONCLUSIVE)  # interval is over, but the latest round is inconclusive
    assert (status.step_index, status.step_outcome) == (0, INCONCLUSIVE)
    assert run.tick(1).step_index == 0
    run.now += 4
    status = run.checks(PASS)  # a later pass: advances in the same call
    assert (status.step_index, status.weight) == (1, 50)


def test_a_failure_within_the_limit_holds_the_step_until_a_pass() -> None:
    run = run_with()
    run.canary_running()
    run.now += 30
    status = run.checks(FAIL)  # failed (1) <= failureLimit (1)
    assert (status.phase, status.step_index, status.counters) == (Phase.PROGRESSING, 0, Counters(failed=1))
    assert run.tick(100).step_index == 0
    assert run.checks(PASS).step_index == 1


def test_a_round_is_as_bad_as_its_worst_check() -> None:
    run = run_with()
    run.canary_running()
    run.now += 30
    status = run.checks(PASS, INCONCLUSIVE)
    assert (status.step_index, status.counters.inconclusive) == (0, 1)
    status = run.checks(PASS, INCONCLUSIVE, FAIL)
    assert (status.step_index, status.counters.failed, status.counters.inconclusive) == (0, 1, 0)


def test_failures_beyond_the_limit_roll_back_at_once_mid_step() -> None:
    run = run_with()
    run.canary_running()
    run.now += 5
    run.checks(FAIL)
    run.now += 5
    status = run.checks(FAIL)
    assert (status.phase, status.weight, status.canary, status.failed_version) == \
        (Phase.ROLLED_BACK, 0, None, "v2")
    assert traffic(run.actions) == [TrafficPlan(stable=backend(make_spec("v1")))]
    [record] = records(run.actions)
    assert record.reason == "rolled back v2: failed (2) > failureLimit (1)"
    assert (record.from_phase, record.to_phase, record.weight) == (Phase.PROGRESSING, Phase.ROLLED_BACK, 0)
    assert record.checks == results(FAIL)
    assert status.counters.failed == 2


def test_failures_count_across_steps() -> None:
    run = run_with()
    run.canary_running()
    run.now += 30
    run.checks(FAIL)
    assert run.checks(PASS).step_index == 1
    run.ack()
    run.now += 5
    assert run.checks(FAIL).phase is Phase.ROLLED_BACK


def test_inconclusive_beyond_the_limit_rolls_back() -> None:
    run = run_with()
    run.canary_running()
    for _ in range(2):
        run.now += 5
        assert run.checks(INCONCLUSIVE).phase is Phase.PROGRESSING
    run.now += 5
    status = run.checks(INCONCLUSIVE)
    assert status.phase is Phase.ROLLED_BACK
    assert records(run.actions)[0].reason == "rolled back v2: inconclusive (3) > inconclusiveLimit (2)"


def test_inconclusive_limit_counts_consecutive_rounds() -> None:
    run = run_with()
    run.canary_running()
    for outcome in (INCONCLUSIVE, INCONCLUSIVE, PASS, INCONCLUSIVE, INCONCLUSIVE):
        run.now += 5
        assert run.checks(outcome).phase is Phase.PROGRESSING
    assert run.status.counters == Counters(passed=1, inconclusive=2)


def test_inconclusive_beyond_the_limit_pauses_when_configured() -> None:
    run = run_with(analysis={**ANALYSIS, "onInconclusive": "pause"})
    run.canary_running()
    for _ in range(3):
        run.now += 5
        status = run.checks(INCONCLUSIVE)
    assert (status.phase, status.hold, status.weight) == (Phase.PAUSED, Hold.INCONCLUSIVE, 10)
    assert status.paused_reason == "inconclusive (3) > inconclusiveLimit (2); waiting for Resume"
    assert traffic(run.actions) == []
    # Still paused when the data returns; checks keep running and a failure still rolls back.
    run.now += 30
    assert run.checks(PASS).phase is Phase.PAUSED
    status = run.send(Resume())
    assert (status.phase, status.step_index, status.counters.inconclusive) == (Phase.PROGRESSING, 0, 0)
    assert status.step_started_at == run.now  # weight unchanged and ACKed: the step restarts now
    assert records(run.actions)[0].reason == "resumed by admin: step 1 restarted"


def test_stale_rounds_are_ignored() -> None:
    run = run_with()
    status = run.canary_running()
    assert status.step_started_at is not None
    run.now += 40
    early = ChecksCompleted(results(FAIL, FAIL), status.step_started_at - 1)  # taken before the ACK
    assert run.send(early).counters == Counters()
    other = ChecksCompleted(results(FAIL), run.now, version="v9")
    assert run.send(other).counters == Counters()
    assert run.send(ChecksCompleted(results(PASS), run.now, version="v2")).step_index == 1


def test_rounds_while_waiting_for_an_ack_are_ignored() -> None:
    run = run_with()
    run.observe(make_spec("v2"))
    assert run.checks(FAIL, FAIL).counters == Counters()


def test_without_analysis_a_step_advances_on_its_interval() -> None:
    run = run_with(analysis=None)
    status = run.canary_running()
    assert next_wakeup(run.spec, status) == status.step_started_at + 30  # type: ignore[operator]
    assert not checks_due(run.spec, status, run.now + 100)
    assert run.tick(30).step_index == 1


def test_the_last_step_promotes_and_the_ack_of_100_makes_it_stable() -> None:
    run = run_with(analysis=None)
    run.canary_running()
    run.tick(30)
    run.ack()
    status = run.tick(30)
    assert (status.phase, status.weight, status.step_started_at) == (Phase.PROMOTING, 100, None)
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 100)]
    assert records(run.actions)[0].reason == "step 2 (50%) passed: 30s elapsed; promoting: 100% to v2"
    assert run.tick(3600).phase is Phase.PROMOTING  # only the ACK completes it
    assert run.send(WeightAcked("v2", 50, run.now)).phase is Phase.PROMOTING
    status = run.ack()
    assert (status.phase, status.stable, status.canary, status.weight) == \
        (Phase.STABLE, backend(make_spec("v2")), None, 0)
    # The old backend is dropped from the desired traffic: the traffic layer removes its cluster.
    assert traffic(run.actions) == [TrafficPlan(stable=backend(make_spec("v2")))]
    assert records(run.actions)[0].reason == "100% to v2 ACKed by every proxy: v2 is stable"
    assert next_wakeup(run.spec, status) is None


# -------------------------------------------------------------------------------------- pause steps


def test_pause_step_without_duration_waits_for_resume() -> None:
    run = run_with(steps=[10, {"pause": {}}, 50], analysis=None)
    run.canary_running()
    status = run.tick(30)
    assert (status.phase, status.hold, status.step_index, status.weight) == (Phase.PAUSED, Hold.STEP, 1, 10)
    assert status.step_started_at == run.now  # same weight, already ACKed
    assert status.paused_reason == (
        "pause step 2 until Resume: waiting for `aviary resume` (next step) or `aviary promote`"
    )
    assert traffic(run.actions) == []
    assert next_wakeup(run.spec, status) is None
    assert run.tick(10_000).phase is Phase.PAUSED
    status = run.send(Resume(by="alice"))
    assert (status.phase, status.step_index, status.weight) == (Phase.PROGRESSING, 2, 50)
    assert records(run.actions)[0].reason == "resumed by alice: pause step 2 over"


def test_timed_pause_step_resumes_by_itself() -> None:
    run = run_with(steps=[10, {"pause": {"duration": "2m"}}, 50], analysis=None)
    run.canary_running()
    status = run.tick(30)
    assert status.paused_reason == "pause step 2 for 2m"
    assert next_wakeup(run.spec, status) == run.now + 120
    assert run.tick(119).phase is Phase.PAUSED
    status = run.tick(1)
    assert (status.phase, status.step_index, status.weight) == (Phase.PROGRESSING, 2, 50)
    assert records(run.actions)[0].reason == "pause step 2 over"


def test_timed_pause_step_with_analysis_needs_a_passing_round() -> None:
    run = run_with(steps=[10, {"pause": {"duration": "1m"}}, 50])
    run.canary_running()
    run.now += 30
    run.checks(PASS)
    assert run.status.hold is Hold.STEP
    run.now += 60
    assert run.checks(INCONCLUSIVE).phase is Phase.PAUSED
    assert run.checks(PASS).step_index == 2


def test_a_first_pause_step_holds_the_canary_at_weight_zero() -> None:
    run = run_with(steps=[{"pause": {"duration": "10s"}}, 20])
    status = run.observe(make_spec("v2", steps=[{"pause": {"duration": "10s"}}, 20]))
    assert (status.phase, status.weight, status.step_started_at) == (Phase.PAUSED, 0, None)
    # The canary cluster is published at weight 0 (make-before-break) ...
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 0)]
    run.spec = make_spec("v2", steps=[{"pause": {"duration": "10s"}}, 20])
    status = run.ack()
    assert not checks_due(run.spec, status, run.now + 100)  # no traffic, nothing to check
    status = run.tick(10)
    assert (status.phase, status.step_index, status.weight) == (Phase.PROGRESSING, 1, 20)


def test_step_weight() -> None:
    spec = make_spec("v1", steps=[{"pause": {}}, 10, {"pause": {}}, 40])
    assert [step_weight(spec, i) for i in range(4)] == [0, 10, 10, 40]


# ---------------------------------------------------------------------------------------- NACKs


def test_a_nack_rolls_back_with_the_message() -> None:
    run = run_with()
    run.observe(make_spec("v2"))
    status = run.send(ProxyNacked("envoy-1", "unknown cluster 'shop-v2'", version="v2"))
    assert (status.phase, status.weight, status.failed_version) == (Phase.ROLLED_BACK, 0, "v2")
    assert traffic(run.actions) == [TrafficPlan(stable=backend(make_spec("v1")))]
    assert records(run.actions)[0].reason == "rolled back v2: proxy envoy-1 NACKed route: unknown cluster 'shop-v2'"


def test_a_nack_for_another_version_or_without_canary_is_ignored() -> None:
    run = run_with()
    run.send(ProxyNacked("envoy-1", "bad"))
    assert (run.status.phase, run.actions) == (Phase.STABLE, [])
    run.canary_running()
    assert run.send(ProxyNacked("envoy-1", "bad", version="v1")).phase is Phase.PROGRESSING


def test_a_nack_during_promotion_rolls_back() -> None:
    run = run_with()
    run.canary_running()
    run.send(Promote())
    assert run.send(ProxyNacked("envoy-2", "oops")).phase is Phase.ROLLED_BACK


# ---------------------------------------------------------------------------- versions in the file


def test_a_newer_version_replaces_the_running_canary_and_resets_everything() -> None:
    run = run_with()
    run.canary_running()
    run.now += 30
    run.checks(FAIL)
    run.checks(PASS)
    run.ack()
    assert (run.status.step_index, run.status.counters.failed) == (1, 1)
    status = run.observe(make_spec("v3"))
    assert (status.phase, status.step_index, status.weight, status.canary) == \
        (Phase.PROGRESSING, 0, 10, backend(make_spec("v3")))
    assert (status.counters, status.acked_weight, status.step_started_at) == (Counters(), None, None)
    assert status.stable == backend(make_spec("v1"))
    assert records(run.actions)[0].reason == "new version v3 replaces canary v2"
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v3")), 10)]


def test_naming_the_stable_version_again_drops_the_canary() -> None:
    run = run_with()
    run.canary_running()
    status = run.observe(make_spec("v1"))
    assert (status.phase, status.canary, status.failed_version) == (Phase.STABLE, None, None)
    assert records(run.actions)[0].reason == "file names stable version v1 again; canary v2 dropped"


def test_rolled_back_version_stays_out_until_the_file_names_another() -> None:
    run = run_with()
    run.canary_running()
    run.send(Abort())
    assert run.observe(make_spec("v2")).phase is Phase.ROLLED_BACK
    assert run.tick(1000).phase is Phase.ROLLED_BACK
    assert run.actions == []
    status = run.observe(make_spec("v3"))
    assert (status.phase, status.canary, status.failed_version) == \
        (Phase.PROGRESSING, backend(make_spec("v3")), None)
    assert records(run.actions)[0].reason == "new version v3 replaces failed v2"


def test_rolled_back_then_stable_named_again() -> None:
    run = run_with()
    run.canary_running()
    run.send(Abort())
    status = run.observe(make_spec("v1"))
    assert (status.phase, status.failed_version) == (Phase.STABLE, None)


def test_stable_again_shows_no_check_values_of_the_canary_that_failed() -> None:
    run = run_with()
    run.canary_running()
    run.now += 5
    run.checks(FAIL)
    run.now += 5
    rolled_back = run.checks(FAIL)
    assert rolled_back.last_checks == results(FAIL)  # why it rolled back: kept while RolledBack
    status = run.observe(make_spec("v1"))
    assert (status.phase, status.last_checks, status.last_check_at) == (Phase.STABLE, (), None)


def test_canary_endpoint_change_republishes_without_restarting() -> None:
    run = run_with()
    run.canary_running()
    started = run.status.step_started_at
    status = run.observe(make_spec("v2", port=9090))
    assert status.canary == backend(make_spec("v2", port=9090))
    assert (status.step_index, status.step_started_at) == (0, started)
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2", port=9090)), 10)]


def test_strategy_removed_mid_canary_switches_at_once() -> None:
    run = run_with()
    run.canary_running()
    status = run.observe(make_spec("v2", strategy=False))
    assert (status.phase, status.stable.version) == (Phase.STABLE, "v2")


def test_steps_edited_mid_canary() -> None:
    run = run_with(analysis=None)
    run.canary_running()
    run.tick(30)
    assert run.status.step_index == 1
    status = run.observe(make_spec("v2", steps=[10]))  # step 2 no longer exists
    assert (status.phase, status.weight) == (Phase.PROMOTING, 100)
    run2 = run_with(analysis=None)
    run2.canary_running()
    status = run2.observe(make_spec("v2", steps=[20, 50]))  # step 1 now means 20%
    assert (status.phase, status.step_index, status.weight, status.step_started_at) == \
        (Phase.PROGRESSING, 0, 20, None)


# ------------------------------------------------------------------------------------ admin commands


def test_pause_and_resume() -> None:
    run = run_with(analysis=None)
    run.canary_running()
    status = run.send(PauseRollout(by="bob"))
    assert (status.phase, status.hold, status.paused_reason) == (Phase.PAUSED, Hold.ADMIN, "paused by bob until Resume")
    assert traffic(run.actions) == []
    assert next_wakeup(run.spec, status) is None
    assert run.tick(1000).phase is Phase.PAUSED
    run.send(PauseRollout())
    assert rejected(run.actions)[0].reason == "already paused: paused by bob until Resume"
    status = run.send(Resume())
    assert (status.phase, status.step_index, status.step_started_at) == (Phase.PROGRESSING, 0, run.now)
    assert run.tick(30).step_index == 1


def test_admin_pause_converts_a_timed_pause_step_into_an_indefinite_one() -> None:
    run = run_with(steps=[10, {"pause": {"duration": "1m"}}, 50], analysis=None)
    run.canary_running()
    run.tick(30)
    status = run.send(PauseRollout())
    assert status.hold is Hold.ADMIN
    assert run.tick(600).phase is Phase.PAUSED
    assert run.send(Resume()).step_index == 2  # Resume at a pause step moves past it


def test_checks_keep_running_while_paused_and_a_failure_still_rolls_back() -> None:
    run = run_with()
    run.canary_running()
    run.send(PauseRollout())
    assert checks_due(run.spec, run.status, run.now + 5)
    run.now += 5
    run.checks(FAIL)
    assert run.checks(FAIL).phase is Phase.ROLLED_BACK


def test_promote_skips_the_remaining_steps() -> None:
    run = run_with()
    run.canary_running()
    status = run.send(Promote(by="carol"))
    assert (status.phase, status.weight) == (Phase.PROMOTING, 100)
    assert records(run.actions)[0].reason == "promoted by carol; promoting: 100% to v2"
    run.send(Promote())
    assert rejected(run.actions)[0].reason == "already promoting"
    assert run.ack().phase is Phase.STABLE


def test_promote_from_a_pause_step() -> None:
    run = run_with(steps=[{"pause": {}}, 50])
    run.observe(make_spec("v2", steps=[{"pause": {}}, 50]))
    assert run.send(Promote()).phase is Phase.PROMOTING


def test_abort_rolls_back_in_one_action() -> None:
    run = run_with()
    run.canary_running()
    status = run.send(Abort(by="dave"))
    assert (status.phase, status.weight, status.failed_version) == (Phase.ROLLED_BACK, 0, "v2")
    assert len(traffic(run.actions)) == 1 and traffic(run.actions)[0].canary_weight == 0
    assert records(run.actions)[0].reason == "rolled back v2: aborted by dave"


def test_abort_during_promotion() -> None:
    run = run_with()
    run.canary_running()
    run.send(Promote())
    status = run.send(Abort())
    assert (status.phase, status.stable.version) == (Phase.ROLLED_BACK, "v1")
    assert traffic_plan(make_spec("v1"), status) == TrafficPlan(stable=backend(make_spec("v1")))


def test_retry_restarts_a_rolled_back_canary() -> None:
    run = run_with()
    run.canary_running()
    run.now += 5
    run.checks(FAIL)
    run.checks(FAIL)
    status = run.send(Retry(by="erin"))
    assert (status.phase, status.step_index, status.weight, status.counters, status.failed_version) == \
        (Phase.PROGRESSING, 0, 10, Counters(), None)
    assert records(run.actions)[0].reason == "retry of v2 by erin"
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 10)]


def test_set_weight_pauses_automation_until_resume() -> None:
    run = run_with()
    run.canary_running()
    status = run.send(SetWeight(30))
    assert (status.phase, status.hold, status.weight, status.manual_weight, status.step_started_at) == \
        (Phase.PAUSED, Hold.MANUAL_WEIGHT, 30, 30, None)
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 30)]
    status = run.ack()
    assert status.step_started_at == run.now
    assert records(run.actions)[0].reason == "30% to v2 ACKed by every proxy: manual weight started"
    run.now += 60
    run.checks(PASS)
    assert run.tick(100).phase is Phase.PAUSED  # no automation
    status = run.send(Resume())
    assert (status.phase, status.weight, status.manual_weight, status.step_started_at) == \
        (Phase.PROGRESSING, 10, None, None)  # back to the step's weight, clock waits for its ACK


def test_set_weight_100_then_promote_completes_at_once() -> None:
    run = run_with()
    run.canary_running()
    run.send(SetWeight(100))
    run.ack()
    status = run.send(Promote())
    assert (status.phase, status.stable.version) == (Phase.STABLE, "v2")
    assert [r.to_phase for r in records(run.actions)] == [Phase.PROMOTING, Phase.STABLE]


def test_set_weight_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        SetWeight(101)


@pytest.mark.parametrize(("command", "reason"), [
    (PauseRollout(), "no canary: rollout is Stable"),
    (Resume(), "no canary: rollout is Stable"),
    (Promote(), "no canary: rollout is Stable"),
    (Abort(), "no canary: rollout is Stable"),
    (Retry(), "nothing to retry: rollout is Stable"),
    (SetWeight(5), "no canary: rollout is Stable"),
])
def test_commands_that_do_not_apply_are_rejected(command: Event, reason: str) -> None:
    run = run_with()
    before = run.status
    status = run.send(command)
    assert status == before
    assert run.actions == [Rejected(command, reason)]  # type: ignore[arg-type]


def test_resume_when_not_paused_and_retry_when_not_rolled_back_are_rejected() -> None:
    run = run_with()
    run.canary_running()
    run.send(Resume())
    assert rejected(run.actions)[0].reason == "not paused: rollout is Progressing"
    run.send(Retry())
    assert rejected(run.actions)[0].reason == "nothing to retry: rollout is Progressing"
    run.send(Abort())
    run.send(PauseRollout())
    assert rejected(run.actions)[0].reason == "no canary: rollout is RolledBack"


def test_transition_event_renders_readably() -> None:
    run = run_with()
    run.canary_running()
    run.send(Abort())
    assert str(records(run.actions)[0]) == "shop: Progressing -> RolledBack: rolled back v2: aborted by admin"


# ------------------------------------------------------------------------------------- properties

SPECS: dict[str, dict[str, Any]] = {
    "analysis": dict(steps=[10, 30, 60]),
    "pauses": dict(steps=[{"pause": {"duration": "20s"}}, 10, {"pause": {}}, 40]),
    "pause-on-inconclusive": dict(steps=[5, {"pause": {"duration": "10s"}}, 25],
                                  analysis={**ANALYSIS, "onInconclusive": "pause", "failureLimit": 0}),
    "no-analysis": dict(steps=[20, 40], analysis=None),
    "cohorts": dict(steps=[{"cohorts": ["qa"]}, 10, {"cohorts": ["beta"]}, {"pause": {}}, 40],
                    cohorts=[{"name": "qa", "match": [{"headers": {"x-team": {"exact": "qa"}}}]},
                             {"name": "beta", "match": [{"cookies": {"beta": {"exact": "1"}}}]}]),
    "after-promotion": dict(steps=[20, 40], keep="45s"),
}
COMMANDS = [PauseRollout(), Resume(), Promote(), Abort(), Retry(), SetWeight(0), SetWeight(35), SetWeight(100)]

_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "tick": st.floats(0.5, 45),
    "ack": st.none(),
    "pass": st.none(),
    "ack-other": st.integers(0, 100),
    "checks": st.lists(st.sampled_from(list(CheckOutcome)), min_size=1, max_size=3),
    "nack": st.none(),
    "cmd": st.sampled_from(COMMANDS),
    "version": st.sampled_from(["v1", "v2", "v3"]),
}
# Weighted towards progress (ticks, ACKs, passing rounds), so runs reach promotion as well as rollback.
_KINDS = ["tick"] * 16 + ["ack"] * 12 + ["pass"] * 12 + ["ack-other", "checks", "checks", "nack", "cmd", "cmd",
                                                       "version"]
_move = st.sampled_from(_KINDS).flatmap(lambda kind: st.tuples(st.just(kind), _ARGS[kind]))
moves = st.lists(_move, min_size=10, max_size=80).map(lambda script: [("version", "v2"), *script])


def play(shape: dict[str, Any], script: list[tuple[str, Any]], check: Any) -> None:
    """Run ``script`` against a rollout and call ``check(old, event, new, actions, spec, now)`` each step."""
    spec = make_spec("v1", **shape)
    now = 0.0
    status, _ = step(spec, None, SpecObserved(spec), now, rollout="shop")
    for kind, arg in script:
        event: Event
        if kind == "tick":
            now += arg
            event = Tick(now)
        elif kind == "ack":
            event = WeightAcked(status.canary.version if status.canary else "v2", status.weight, now, status.cohorts)
        elif kind == "ack-other":
            event = WeightAcked(status.canary.version if status.canary else "v2", arg, now)
        elif kind == "checks":
            event = ChecksCompleted(results(*arg), now)
        elif kind == "pass":
            event = ChecksCompleted(results(PASS), now)
        elif kind == "nack":
            event = ProxyNacked("envoy-1", "rejected")
        elif kind == "cmd":
            event = arg
        else:
            spec = make_spec(arg, **shape)
            event = SpecObserved(spec)
        new, actions = step(spec, status, event, now)
        check(status, event, new, actions, spec, now)
        status = new


def max_step_weight(spec: RolloutSpec) -> int:
    assert spec.strategy is not None
    return max(spec.strategy.weights)


@settings(max_examples=300)
@given(shape=st.sampled_from(list(SPECS)), script=moves)
def test_invariants_of_every_call(shape: str, script: list[tuple[str, Any]]) -> None:
    def check(old: RolloutStatus, event: Event, new: RolloutStatus, actions: list[Action],
              spec: RolloutSpec, now: float) -> None:
        # SetTraffic exactly when the desired traffic changed, and at most once.
        sets = traffic(actions)
        if traffic_plan(spec, new) != traffic_plan(spec, old):
            assert sets == [traffic_plan(spec, new)]
        else:
            assert sets == []
        # Every phase change is recorded, and the last record describes the new status.
        if (new.phase, new.step_index, new.canary) != (old.phase, old.step_index, old.canary):
            assert records(actions)
            assert records(actions)[-1].to_phase is new.phase
            assert records(actions)[-1].weight == new.weight
        # Weight above the last step only while promoting, guarding the promotion or set by hand.
        if new.phase not in (Phase.PROMOTING, Phase.GUARDING) and new.manual_weight is None:
            assert new.weight <= max_step_weight(spec)
        # A wake-up is never in the past unless a check round is overdue (no busy loop).
        wake = next_wakeup(spec, new)
        assert wake is None or wake > now or checks_due(spec, new, now)
        # Cohorts: those of the steps so far (a manual weight keeps them); none without a canary or
        # while promoting, so a rollback closes every cohort in its one plan.
        if new.canary is None or new.phase in (Phase.PROMOTING, Phase.GUARDING):
            assert new.cohorts == () and traffic_plan(spec, new).cohorts == ()
        else:
            assert new.cohorts == step_cohorts(spec, new.step_index)
        # The afterPromotion window only with it, and with the previous version still published.
        if new.phase is Phase.GUARDING:
            assert spec.strategy is not None and spec.strategy.after_promotion is not None
            assert traffic_plan(spec, new).canary_weight == 100 and traffic_plan(spec, new).stable == new.stable
        # Rolled back means canary weight 0 with no canary in the desired traffic.
        if new.phase is Phase.ROLLED_BACK:
            assert traffic_plan(spec, new).canary_weight == 0 and traffic_plan(spec, new).canary is None

    play(SPECS[shape], script, check)


@settings(max_examples=300)
@given(shape=st.sampled_from(list(SPECS)), script=moves)
def test_every_rollback_is_one_action_to_weight_zero(shape: str, script: list[tuple[str, Any]]) -> None:
    seen: list[Event] = []

    def check(old: RolloutStatus, event: Event, new: RolloutStatus, actions: list[Action],
              spec: RolloutSpec, now: float) -> None:
        if new.phase is Phase.ROLLED_BACK and old.phase is not Phase.ROLLED_BACK:
            seen.append(event)
            [traffic_change] = traffic(actions)
            assert traffic_change.canary_weight == 0 and traffic_change.canary is None
            assert traffic_change.stable == old.stable
            assert [r.to_phase for r in records(actions)].count(Phase.ROLLED_BACK) == 1
        if isinstance(event, Abort) and old.canary is not None:
            assert new.phase is Phase.ROLLED_BACK
            assert traffic_plan(spec, new).canary_weight == 0

    play(SPECS[shape], script, check)


@settings(max_examples=300)
@given(shape=st.sampled_from(list(SPECS)), script=moves)
def test_automation_advances_only_after_a_passing_round(shape: str, script: list[tuple[str, Any]]) -> None:
    def check(old: RolloutStatus, event: Event, new: RolloutStatus, actions: list[Action],
              spec: RolloutSpec, now: float) -> None:
        automated = isinstance(event, Tick | ChecksCompleted | WeightAcked)
        same_canary = old.canary is not None and new.canary == old.canary
        advanced = same_canary and (new.step_index > old.step_index or
                                    (new.phase is Phase.PROMOTING and old.phase is not Phase.PROMOTING))
        # The afterPromotion window ends like a step: after a passing round.
        advanced = advanced or (old.phase is Phase.GUARDING and new.phase is Phase.STABLE
                                and new.stable == old.canary)
        if not (automated and advanced and spec.analysis is not None and old.weight > 0):
            return
        latest: CheckOutcome | None
        # (A round that ends the window is counted, then the counters reset with the new stable version.)
        if isinstance(event, ChecksCompleted) and (new.counters != old.counters or new.stable != old.stable):
            latest = round_outcome(event.results)
        else:
            latest = old.step_outcome
        assert latest is PASS
        assert new.counters.inconclusive == 0

    play(SPECS[shape], script, check)


@settings(max_examples=200)
@given(script=st.lists(st.one_of(
    st.tuples(st.just("tick"), st.floats(0.5, 45)),
    st.tuples(st.just("ack"), st.none()),
    st.tuples(st.just("checks"), st.lists(st.sampled_from([INCONCLUSIVE, FAIL]), min_size=1, max_size=3)),
    st.tuples(st.just("cmd"), st.sampled_from([PauseRollout(), SetWeight(20), Abort(), Retry()])),
), max_size=80))
def test_without_a_passing_round_the_canary_never_leaves_its_first_step(script: list[tuple[str, Any]]) -> None:
    shape = dict(steps=[10, 30], analysis={**ANALYSIS, "failureLimit": 100, "inconclusiveLimit": 100})

    def check(old: RolloutStatus, event: Event, new: RolloutStatus, actions: list[Action],
              spec: RolloutSpec, now: float) -> None:
        assert new.step_index == 0
        assert new.phase is not Phase.PROMOTING and new.stable.version == "v1"
        assert new.weight <= 20

    play(shape, [("version", "v2"), *script], check)
