"""The guarded promotion (``strategy.afterPromotion``): its spelling, its phase, and a restart in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from aviary.admin.convert import WallClock, event_message, rollout_message
from aviary.admin.render import apply_event, as_json, guard_text, rollout_detail, rollout_line, watch_view
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout import (
    Abort,
    PauseRollout,
    Phase,
    Promote,
    ProxyNacked,
    Resume,
    RolloutStatus,
    SetWeight,
    Tick,
    TransitionEvent,
    WeightAcked,
    analysis_for,
    checks_due,
    guard_analysis,
    guard_left,
    next_wakeup,
    step,
    traffic_plan,
)
from aviary.policy.schema import Rollout, RolloutSpec
from aviary.runner import RolloutRunner, moves_away_from_stable, stopped_for_restart
from aviary.store.sqlite import SavedRollout, StateStore
from aviary.traffic import TrafficPlan
from tests.unit.test_rollout_machine import (
    ANALYSIS,
    FAIL,
    INCONCLUSIVE,
    PASS,
    Run,
    backend,
    make_spec,
    records,
    rejected,
    traffic,
)

KEEP = "1m"


def guarded(version: str = "v1", keep: str | None = KEEP, analysis: Any = ANALYSIS,
            steps: list[Any] | None = None) -> RolloutSpec:
    return make_spec(version, steps=steps, analysis=analysis, keep=keep)


class GuardRun(Run):
    def promote_to_window(self) -> RolloutStatus:
        """v2 through both steps (a passing round each) and its 100 % ACKed: the window has begun."""
        self.observe(guarded("v2", **self.shape))
        self.ack()
        for _ in range(2):
            if self.spec.analysis is not None:
                self.now += 5
                self.checks(PASS)
            self.tick(30 if self.spec.analysis is None else 25)
            self.ack()
        return self.status


def guard_run(**shape: Any) -> GuardRun:
    return GuardRun(guarded("v1", **shape), shape=shape)


# ------------------------------------------------------------------------------------------- schema


POLICY = """apiVersion: aviary.dev/v1
kind: Rollout
metadata: {name: shop}
spec:
  listener: {port: 10000}
  hosts: ["*"]
  version: v2
  endpoints: ["127.0.0.1:8081"]
  strategy:
    steps: [5, 20, 50]
    afterPromotion: %s
"""


@pytest.mark.parametrize("text, keep", [("{keep: 15m}", 900.0), ("{keep: 1m30s}", 90.0), ("{keep: 500ms}", 0.5),
                                        ("null", None)])
def test_after_promotion_is_read(text: str, keep: float | None) -> None:
    rollout, errors = parse_policy_text(POLICY % text, "shop.yaml")
    assert errors == [] and rollout is not None and rollout.spec.strategy is not None
    after = rollout.spec.strategy.after_promotion
    assert (after.keep if after else None) == keep


def test_without_after_promotion_there_is_none() -> None:
    assert make_spec("v2").strategy is not None and make_spec("v2").strategy.after_promotion is None  # type: ignore[union-attr]


@pytest.mark.parametrize("text, field, reason", [
    ("15m", "spec.strategy.afterPromotion", "expected {keep: 15m}, got '15m'"),
    ("{}", "spec.strategy.afterPromotion.keep", "required field is missing"),
    ("{keep: 0s}", "spec.strategy.afterPromotion.keep", "duration must be greater than zero, got '0s'"),
    ("{keep: [1m]}", "spec.strategy.afterPromotion.keep", "expected a duration"),
    ("{keep: soon}", "spec.strategy.afterPromotion.keep", "invalid duration 'soon'"),
    ("{keep: 1m, warm: true}", "spec.strategy.afterPromotion.warm", "unknown field 'warm'"),
])
def test_bad_after_promotion_is_one_line_naming_the_field(text: str, field: str, reason: str) -> None:
    rollout, errors = parse_policy_text(POLICY % text, "shop.yaml")
    assert rollout is None
    assert [e.field for e in errors] == [field], errors
    assert reason in errors[0].reason and "\n" not in errors[0].reason


def test_after_promotion_survives_the_json_round_trip_of_the_store() -> None:
    rollout, _ = parse_policy_text(POLICY % "{keep: 15m}", "shop.yaml")
    assert rollout is not None
    assert Rollout.model_validate_json(rollout.model_dump_json(by_alias=True)) == rollout
    without, _ = parse_policy_text(POLICY % "null", "shop.yaml")
    assert without is not None
    assert Rollout.model_validate_json(without.model_dump_json(by_alias=True)) == without


# ------------------------------------------------------------------------------------------ machine


def test_promotion_enters_the_window_with_the_previous_version_warm() -> None:
    run = guard_run()
    run.observe(guarded("v2"))
    run.ack()
    run.now += 5
    run.checks(PASS)
    run.tick(25)
    run.ack()
    run.now += 5
    run.checks(PASS)
    assert run.tick(25).phase is Phase.PROMOTING
    status = run.ack()
    assert (status.phase, status.stable, status.canary, status.weight) == \
        (Phase.GUARDING, backend(make_spec("v1")), backend(make_spec("v2")), 100)
    # Nothing to publish: the plan at 100 % already keeps v1's cluster (weight 0).
    assert traffic(run.actions) == []
    assert traffic_plan(run.spec, status) == TrafficPlan(backend(make_spec("v1")), backend(make_spec("v2")), 100)
    assert records(run.actions)[-1].reason == \
        "100% to v2 ACKed by every proxy: v2 promoted; v1 kept warm for 1m (afterPromotion)"
    assert status.step_started_at == run.now and guard_left(run.spec, status, run.now + 20) == 40
    # Checks go on in the window, every checkEvery.
    assert not checks_due(run.spec, status, run.now + 4) and checks_due(run.spec, status, run.now + 5)
    assert next_wakeup(run.spec, status) == run.now + 5


def test_a_failure_in_the_window_reverts_to_the_previous_version_in_one_plan() -> None:
    run = guard_run()
    run.promote_to_window()
    run.now += 5
    assert run.checks(FAIL).phase is Phase.GUARDING  # failureLimit 1: one is tolerated
    run.now += 5
    status = run.checks(FAIL)
    assert (status.phase, status.stable.version, status.canary, status.failed_version) == \
        (Phase.ROLLED_BACK, "v1", None, "v2")
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")))]
    [event] = records(run.actions)
    assert event.reason == "reverted to v1 within afterPromotion: failed (2) > failureLimit (1)"
    assert event.from_phase is Phase.GUARDING and event.checks
    # The reverted version stays out, as after any rollback.
    assert run.tick(3600).phase is Phase.ROLLED_BACK


def test_failures_of_the_steps_count_in_the_window() -> None:
    run = guard_run()
    run.observe(guarded("v2"))
    run.ack()
    run.now += 5
    run.checks(FAIL)  # the one failure failureLimit 1 tolerates, spent during the first step
    for rest in (20, 25):
        run.now += 5
        run.checks(PASS)
        run.tick(rest)
        run.ack()
    assert run.status.phase is Phase.GUARDING
    run.now += 5
    assert run.checks(FAIL).phase is Phase.ROLLED_BACK


def test_inconclusive_rounds_over_the_limit_revert() -> None:
    run = guard_run()
    run.promote_to_window()
    for _ in range(3):
        run.now += 5
        run.checks(INCONCLUSIVE)
    assert run.status.phase is Phase.ROLLED_BACK
    assert records(run.actions)[-1].reason == \
        "reverted to v1 within afterPromotion: inconclusive (3) > inconclusiveLimit (2)"


def test_with_on_inconclusive_pause_they_hold_the_window_open_until_a_round_passes() -> None:
    run = guard_run(analysis={**ANALYSIS, "onInconclusive": "pause"})
    started = run.promote_to_window().step_started_at
    assert started is not None
    for _ in range(3):
        run.now += 5
        run.checks(INCONCLUSIVE)
    assert run.status.phase is Phase.GUARDING
    assert records(run.actions)[0].reason.startswith("afterPromotion window held open: inconclusive (3) > ")
    run.now += 5
    run.checks(INCONCLUSIVE)
    assert records(run.actions) == []  # said once
    assert run.tick(120).phase is Phase.GUARDING
    status = run.checks(PASS)
    assert status.phase is Phase.STABLE and status.stable.version == "v2"


def test_the_window_ends_after_keep_and_a_passing_round_retiring_the_previous_version() -> None:
    run = guard_run()
    status = run.promote_to_window()
    started = status.step_started_at
    assert started is not None
    assert run.tick(70).phase is Phase.GUARDING  # time is up, but no round passed in the window
    run.checks(PASS)
    status = run.status
    assert (status.phase, status.stable, status.canary, status.weight) == \
        (Phase.STABLE, backend(make_spec("v2")), None, 0)
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v2")))]  # v1's cluster leaves
    assert records(run.actions)[-1].reason == \
        "afterPromotion window (1m) over and the latest check round passed: v2 is stable, v1 retired"
    assert next_wakeup(run.spec, status) is None


def test_a_failure_within_the_limit_holds_the_window_until_a_round_passes() -> None:
    run = guard_run()
    run.promote_to_window()
    run.now += 55
    run.checks(FAIL)
    assert run.tick(10).phase is Phase.GUARDING
    run.checks(PASS)
    assert run.status.phase is Phase.STABLE


def test_without_analysis_the_window_ends_on_time_alone() -> None:
    run = guard_run(analysis=None)
    status = run.promote_to_window()
    assert status.phase is Phase.GUARDING and next_wakeup(run.spec, status) == run.now + 60
    assert run.tick(59).phase is Phase.GUARDING
    status = run.tick(1)
    assert status.phase is Phase.STABLE and status.stable.version == "v2"
    assert records(run.actions)[-1].reason == "afterPromotion window (1m) over: v2 is stable, v1 retired"


def test_comparisons_with_the_stable_version_are_left_out_of_the_window() -> None:
    compare = {"name": "vs-stable", "template": "request-success-rate", "maxDecreaseFromStable": 1}
    both = {"name": "both", "template": "request-success-rate", "min": 90, "maxDecreaseFromStable": 1}
    latency = {"name": "latency", "template": "request-duration-p99", "max": 500}
    spec = make_spec("v2", analysis={**ANALYSIS, "metrics": [compare, both, latency]})
    assert spec.analysis is not None
    kept = guard_analysis(spec.analysis)
    assert kept is not None
    assert [(m.name, m.min, m.max, m.max_decrease_from_stable) for m in kept.metrics] == \
        [("both", 90, None, None), ("latency", None, 500, None)]
    assert (kept.failure_limit, kept.check_every) == (spec.analysis.failure_limit, spec.analysis.check_every)
    assert guard_analysis(make_spec("v2", analysis={**ANALYSIS, "metrics": [compare]}).analysis) is None
    assert guard_analysis(None) is None


def test_with_only_comparisons_no_check_runs_in_the_window_and_it_ends_on_time() -> None:
    compare = {"name": "vs-stable", "template": "request-success-rate", "maxDecreaseFromStable": 1}
    run = guard_run(analysis={**ANALYSIS, "metrics": [compare]})
    status = run.promote_to_window()
    assert status.phase is Phase.GUARDING
    assert analysis_for(run.spec, status) is None
    assert not checks_due(run.spec, status, run.now + 30)
    assert run.tick(60).phase is Phase.STABLE


def test_promote_ends_the_window_now() -> None:
    run = guard_run()
    run.promote_to_window()
    status = run.send(Promote(by="alice"))
    assert status.phase is Phase.STABLE and status.stable.version == "v2"
    assert records(run.actions)[-1].reason == "afterPromotion window ended by alice: v2 is stable, v1 retired"
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v2")))]


@pytest.mark.parametrize("revert", [Abort(by="alice"), ProxyNacked("envoy-1", "bad route", "v2")])
def test_abort_or_a_nack_reverts_now(revert: Abort | ProxyNacked) -> None:
    run = guard_run()
    run.promote_to_window()
    status = run.send(revert)
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2"
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v1")))]
    assert records(run.actions)[-1].reason.startswith("reverted to v1 within afterPromotion: ")


@pytest.mark.parametrize("command", [PauseRollout(), Resume(), SetWeight(50)])
def test_pause_resume_and_set_weight_are_refused_in_the_window(command: Any) -> None:
    run = guard_run()
    before = run.promote_to_window()
    assert run.send(command) == before
    [refused] = rejected(run.actions)
    assert refused.reason == "v2 is promoted and v1 kept warm: promote ends the window now, abort reverts to v1"


def test_a_new_version_in_the_window_starts_from_the_promoted_one() -> None:
    run = guard_run()
    run.promote_to_window()
    status = run.observe(guarded("v3"))
    assert (status.phase, status.stable.version, status.canary.version if status.canary else None, status.weight) \
        == (Phase.PROGRESSING, "v2", "v3", 10)
    assert [r.to_phase for r in records(run.actions)] == [Phase.STABLE, Phase.PROGRESSING]
    assert traffic(run.actions) == [TrafficPlan(backend(make_spec("v2")), backend(make_spec("v3")), 10)]


def test_naming_the_previous_version_again_goes_back_to_it() -> None:
    run = guard_run()
    run.promote_to_window()
    status = run.observe(guarded("v1"))
    assert (status.phase, status.stable.version, status.canary) == (Phase.STABLE, "v1", None)


def test_removing_after_promotion_from_the_file_ends_the_window() -> None:
    run = guard_run()
    run.promote_to_window()
    status = run.observe(guarded("v2", keep=None))
    assert status.phase is Phase.STABLE and status.stable.version == "v2"
    assert records(run.actions)[-1].reason == "afterPromotion removed from the file: v2 is stable, v1 retired"


def test_without_after_promotion_the_ack_of_100_is_stable_as_before() -> None:
    run = guard_run(keep=None)
    status = run.promote_to_window()
    assert status.phase is Phase.STABLE and status.stable.version == "v2"
    assert records(run.actions)[-1].reason == "100% to v2 ACKed by every proxy: v2 is stable"


def test_the_window_is_neither_a_move_away_from_stable_nor_its_end() -> None:
    run = guard_run()
    run.observe(guarded("v2"))
    run.ack()
    promoting = run.send(Promote())
    guarding = run.ack()
    assert guarding.phase is Phase.GUARDING
    assert not moves_away_from_stable(promoting, guarding)
    ended = run.send(Promote())
    assert not moves_away_from_stable(guarding, ended)


def test_guarding_needs_weight_100_and_no_cohort() -> None:
    v1, v2 = backend(make_spec("v1")), backend(make_spec("v2"))
    with pytest.raises(ValueError, match="Guarding"):
        RolloutStatus("shop", Phase.GUARDING, v1, v2, weight=50)
    with pytest.raises(ValueError, match="Guarding"):
        RolloutStatus("shop", Phase.GUARDING, v1, v2, weight=100, cohorts=("qa",))


# ------------------------------------------------------------------------------------------ restart


def window_policy() -> Rollout:
    rollout, errors = parse_policy_text(POLICY % "{keep: 1m}", "shop.yaml")
    assert rollout is not None, errors
    return rollout


def test_a_restart_mid_window_resumes_it_from_the_saved_status(tmp_path: Path) -> None:
    """Saved 20 s into a 1 m window; back 100 s later: the window waits for the ACK of 100 %, then
    runs its remaining 40 s, and only then retires v1."""
    rollout = window_policy()
    spec = rollout.spec
    v1 = backend(make_spec("v1"))
    v2 = type(v1)("v2", spec.endpoints)
    guarding = RolloutStatus("shop", Phase.GUARDING, v1, v2, weight=100, step_index=2, step_started_at=1000.0,
                             acked_weight=100, step_outcome=PASS, step_checked_at=1015.0)
    store = StateStore(tmp_path / "state.db")
    store.save(guarding, rollout, [])
    store.close()
    saved = StateStore(tmp_path / "state.db").load()
    assert saved["shop"].status == guarding  # the phase and the window's clock survive the JSON

    now = [1120.0]
    director = TrafficDirector(SnapshotCache(), ProxyStatus())
    director.expect_proxies({"envoy-1"}, grace=600)
    runner = RolloutRunner(director, clock=lambda: now[0])
    entry = saved["shop"]  # saved_at is on the wall clock; this test's engine clock starts at 1000
    runner.restore({"shop": SavedRollout(entry.status, entry.rollout, 1020.0, None, ())}, last_alive=1020.0)
    desired = director.desired("shop")
    assert desired is not None and (desired.stable.version, desired.canary_weight) == ("v1", 100)
    runner.handle("shop", Tick(now[0]))  # long past the window's end: nothing may end it before the ACK
    status = runner.status("shop")
    assert status is not None and status.phase is Phase.GUARDING and status.step_started_at is None
    assert guard_left(spec, status, now[0]) is None

    runner.handle("shop", WeightAcked("v2", 100, now[0]))
    status = runner.status("shop")
    assert status is not None and status.step_started_at == 1120.0 - 20.0  # 20 s of it were spent
    assert guard_left(spec, status, now[0]) == 40.0
    now[0] += 39
    runner.handle("shop", Tick(now[0]))
    assert runner.status("shop").phase is Phase.GUARDING  # type: ignore[union-attr]
    now[0] += 2
    runner.handle("shop", Tick(now[0]))
    status = runner.status("shop")
    assert status is not None and (status.phase, status.stable.version) == (Phase.STABLE, "v2")
    desired = director.desired("shop")
    assert desired is not None and (desired.stable.version, desired.canary) == ("v2", None)


def test_a_status_saved_before_the_window_existed_still_loads(tmp_path: Path) -> None:
    """The window added a phase and a policy field, no status field: an old row reads as before."""
    rollout = window_policy()
    old_policy = rollout.model_dump_json(by_alias=True).replace(',"afterPromotion":{"keep":60.0}', "")
    assert "afterPromotion" not in old_policy
    old = Rollout.model_validate_json(old_policy)
    assert old.spec.strategy is not None and old.spec.strategy.after_promotion is None
    status, resumption = stopped_for_restart(
        RolloutStatus("shop", Phase.PROMOTING, backend(make_spec("v1")), backend(make_spec("v2")), weight=100),
        1000.0)
    assert status.phase is Phase.PROMOTING and resumption is None
    after, _ = step(old.spec, status, WeightAcked("v2", 100, 1001.0), 1001.0)
    assert after.phase is Phase.STABLE


# ------------------------------------------------------------------------------------------- output


def window_message(started_at: float | None, now: float) -> Any:
    spec = make_spec("v2", keep="15m")
    status = RolloutStatus("shop", Phase.GUARDING, backend(make_spec("v1")), backend(spec), weight=100,
                           step_index=1, step_started_at=started_at, acked_weight=100,
                           reason="100% to v2 ACKed by every proxy: v2 promoted; v1 kept warm for 15m (afterPromotion)")
    return rollout_message(status, spec, [], WallClock(now, 1_700_000_000.0))


def test_status_says_which_version_is_kept_warm_and_for_how_long() -> None:
    message = window_message(1000.0, 1000.0 + 140.0)
    assert (message.phase, message.kept_version, message.keep_seconds_left, message.keep_seconds) == \
        ("Guarding", "v1", 760.0, 900.0)
    assert guard_text(message) == "v2 promoted; v1 kept warm for 12m 40s more"
    assert rollout_line(message).startswith("shop: Guarding, v2 promoted; v1 kept warm for 12m 40s more: 100% to v2")
    data = json.loads(as_json(message))
    assert (data["kept_version"], data["keep_seconds_left"], data["keep_seconds"]) == ("v1", 760.0, 900.0)
    console = Console(width=200, record=True)
    console.print(rollout_detail(message))
    console.print(watch_view({"shop": message}, []))
    text = console.export_text()
    assert "v1 (warm)" in text and "after promotion" in text and "(afterPromotion keep 15m)" in text
    assert "v1 kept warm for 12m 40s more" in text


def test_status_while_the_window_waits_for_an_ack_or_a_passing_round() -> None:
    waiting = window_message(None, 5000.0)
    assert not waiting.HasField("keep_seconds_left")
    assert guard_text(waiting) == "v2 promoted; v1 kept warm (the window waits for every proxy to ACK 100% again)"
    over = window_message(1000.0, 5000.0)
    assert over.keep_seconds_left == 0 and guard_text(over) == "v2 promoted; v1 kept warm until a check round passes"


def test_outside_the_window_nothing_is_kept() -> None:
    spec = make_spec("v2", keep="15m")
    message = rollout_message(RolloutStatus("shop", Phase.STABLE, backend(spec)), spec, [], WallClock(0.0, 0.0))
    assert (message.kept_version, message.HasField("keep_seconds_left"), message.keep_seconds) == ("", False, 0.0)
    data = json.loads(as_json(message))
    assert (data["kept_version"], "keep_seconds_left" in data, data["keep_seconds"]) == ("", False, 0.0)
    assert guard_text(message) == ""


def test_watch_follows_the_window_from_events() -> None:
    started = window_message(1000.0, 1000.0)
    event = TransitionEvent("shop", 1061.0, Phase.GUARDING, Phase.STABLE, 0, "v2", None, 1,
                            "afterPromotion window (15m) over: v2 is stable, v1 retired")
    after = apply_event(started, event_message(event, WallClock(1061.0, 1_700_000_000.0)))
    assert (after.phase, after.kept_version, after.HasField("keep_seconds_left")) == ("Stable", "", False)
    entering = TransitionEvent("shop", 1000.0, Phase.PROMOTING, Phase.GUARDING, 100, "v1", "v2", 1, "promoted")
    during = apply_event(None, event_message(entering, WallClock(1000.0, 1_700_000_000.0)))
    assert during.kept_version == "v1" and guard_text(during).startswith("v2 promoted; v1 kept warm")


def test_the_blue_green_example_is_a_cohort_step_plus_after_promotion() -> None:
    path = Path(__file__).resolve().parents[2] / "policies" / "blue-green.yaml"
    rollout, errors = parse_policy_text(path.read_text(), str(path))
    assert errors == [] and rollout is not None and rollout.spec.strategy is not None
    strategy = rollout.spec.strategy
    assert [type(step).__name__ for step in strategy.steps] == ["CohortStep"]
    assert strategy.after_promotion is not None and strategy.after_promotion.keep == 900.0
