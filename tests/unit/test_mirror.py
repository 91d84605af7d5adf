"""Mirroring (``{mirror: N}`` steps): the schema, the pure engine, the route's rendering, the admin
view and the storage of what was published.

The rendering is checked twice: by reading the route back (one ``request_mirror_policies`` entry on
the weighted default, a runtime fraction of N/HUNDRED, the canary's cluster) and by ``envoy --mode
validate`` on a sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.type.v3 import percent_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from aviary.admin.convert import WallClock, event_message, rollout_message
from aviary.admin.render import apply_event, as_json, event_line, rollout_detail, rollout_line, watch_view
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import PublishedRollout, build_snapshot, violations
from aviary.policy.analysis import CheckOutcome, CheckResult, Thresholds, judge
from aviary.policy.rollout import (
    Abort,
    ChecksCompleted,
    Phase,
    Promote,
    RecordEvent,
    RolloutStatus,
    SetWeight,
    SpecObserved,
    Tick,
    WeightAcked,
    checks_due,
    step,
    step_mirror,
    traffic_plan,
)
from aviary.policy.schema import ListenerSpec, MetricCheck, MirrorStep, RolloutSpec
from aviary.runner import moves_away_from_stable
from aviary.store.sqlite import _STATUS, SavedPublished, decode_published, encode_published
from aviary.traffic import Backend, Stickiness, TrafficPlan
from tests.unit.builders import V1, V2, assert_envoy_accepts, parse, plans, published, routes_of, spec_of

ISSUE_POLICY = """\
apiVersion: aviary.dev/v1
kind: Rollout
metadata: {name: checkout}
spec:
  listener: {port: 10000}
  hosts: ["*"]
  version: v2
  endpoints: ["10.0.0.8:8080"]
  strategy:
    cohorts:
      - name: internal
        match:
          - headers: {x-team: {exact: qa}}
    steps:
      - {cohorts: [internal]}
      - {mirror: 100}
      - 5
      - 20
    interval: 1m
  analysis:
    checkEvery: 5s
    window: 30s
    failureLimit: 0
    inconclusiveLimit: 5
    metrics:
      - {name: success, template: request-success-rate, min: 99}
"""

PASS, FAIL, INCONCLUSIVE = CheckOutcome.PASS, CheckOutcome.FAIL, CheckOutcome.INCONCLUSIVE


def spec(version: str) -> RolloutSpec:
    return spec_of(ISSUE_POLICY.replace("version: v2", f"version: {version}"))


# ---- schema -------------------------------------------------------------------------------------


def test_the_issue_spelling_parses_and_round_trips_through_the_store() -> None:
    rollout, errors = parse(ISSUE_POLICY)
    assert errors == []
    assert rollout.spec.strategy.steps[1] == MirrorStep(100)
    assert [step_mirror(rollout.spec, i) for i in range(5)] == [0, 100, 0, 0, 0]
    dumped = json.loads(rollout.model_dump_json(by_alias=True))
    assert dumped["spec"]["strategy"]["steps"][1] == {"mirror": 100}
    assert type(rollout).model_validate_json(rollout.model_dump_json(by_alias=True)) == rollout


def test_a_strategy_of_mirror_steps_only_is_valid() -> None:
    _, errors = parse(ISSUE_POLICY.replace("- {cohorts: [internal]}\n", "").replace("      - 5\n      - 20\n", ""))
    assert errors == []


@pytest.mark.parametrize(("new", "error"), [
    ("{mirror: 0}", "spec.strategy.steps[1].mirror: expected a whole percent between 1 and 100, got 0"),
    ("{mirror: 101}", "spec.strategy.steps[1].mirror: expected a whole percent between 1 and 100, got 101"),
    ("{mirror: 50.5}", "spec.strategy.steps[1].mirror: expected a whole percent between 1 and 100, got 50.5"),
    ("{mirror: true}", "spec.strategy.steps[1].mirror: expected a whole percent between 1 and 100, got True"),
    ('{mirror: "50"}', "spec.strategy.steps[1].mirror: expected a whole percent between 1 and 100, got '50'"),
    ("{mirror: }", "spec.strategy.steps[1].mirror: expected a whole percent between 1 and 100, got None"),
    ("{mirror: 50, pause: {}}", "spec.strategy.steps[1]: expected a weight 1..99"),
    ("{mirorr: 50}", "spec.strategy.steps[1]: expected a weight 1..99, {pause: {}}, {pause: {duration: 5m}}, "
                     "{cohorts: [NAME, ...]} or {mirror: 1..100}"),
])
def test_bad_mirror_steps_give_one_line_naming_file_and_field(new: str, error: str) -> None:
    _, errors = parse(ISSUE_POLICY.replace("{mirror: 100}", new, 1))
    assert len(errors) == 1 and errors[0].startswith(f"checkout.yaml: {error}"), errors
    assert "\n" not in errors[0]


# ---- the pure engine ----------------------------------------------------------------------------


def results(*outcomes: CheckOutcome) -> tuple[CheckResult, ...]:
    return tuple(CheckResult(f"m{i}", o, 1.0, None, Thresholds(min=0.0), o.value) for i, o in enumerate(outcomes))


def at_mirror_step() -> tuple[RolloutSpec, RolloutStatus, float]:
    """v1 stable, v2's cohort step ACKed and passed: the mirror step is set, its plan not ACKed yet."""
    v1, v2 = spec("v1"), spec("v2")
    status, _ = step(v1, None, SpecObserved(v1), 0.0, rollout="checkout")
    status, _ = step(v2, status, SpecObserved(v2), 1.0)
    status, _ = step(v2, status, WeightAcked("v2", 0, 1.0, ("internal",)), 1.0)
    status, _ = step(v2, status, ChecksCompleted(results(PASS), 60.0), 60.0)
    status, actions = step(v2, status, Tick(61.0), 61.0)
    assert (status.step_index, status.weight, status.cohorts, status.mirror) == (1, 0, ("internal",), 100)
    [plan] = plans(actions)
    assert (plan.canary_weight, plan.cohort_names, plan.mirror) == (0, ("internal",), 100)
    assert status.step_started_at is None
    return v2, status, 61.0


def test_a_mirror_step_keeps_the_weight_and_the_cohorts_and_starts_when_its_mirror_is_acked() -> None:
    v2, status, now = at_mirror_step()
    status, _ = step(v2, status, WeightAcked("v2", 0, now, ("internal",)), now)  # the previous plan's ACK
    assert status.step_started_at is None and status.acked_mirror == 0
    status, actions = step(v2, status, WeightAcked("v2", 0, now, ("internal",), 100), now)
    assert status.step_started_at == now and status.acked_mirror == 100
    assert "0% and cohorts internal, mirroring 100%, to v2 ACKed by every proxy: step 2 started" in status.reason
    [record] = [a.event for a in actions if isinstance(a, RecordEvent)]
    assert record.mirror == 100
    assert "canary v2 at 0% and cohorts internal, mirroring 100%" in str(record)


def test_checks_apply_in_a_mirror_step_and_a_pass_moves_on_without_the_mirror() -> None:
    v2, status, now = at_mirror_step()
    status, _ = step(v2, status, WeightAcked("v2", 0, now, ("internal",), 100), now)
    assert checks_due(v2, status, now + 5)  # the copies are canary traffic to judge
    status, _ = step(v2, status, Tick(now + 60), now + 60)
    assert status.step_index == 1  # the interval is over but no round passed yet
    status, _ = step(v2, status, ChecksCompleted(results(INCONCLUSIVE), now + 60), now + 60)
    status, _ = step(v2, status, Tick(now + 61), now + 61)
    assert status.step_index == 1  # inconclusive (say, fewer copies than minRequests) never advances
    status, actions = step(v2, status, ChecksCompleted(results(PASS), now + 65), now + 65)  # advances at once
    assert (status.step_index, status.weight, status.cohorts, status.mirror) == (2, 5, ("internal",), 0)
    assert "step 2 (0%, mirroring 100%) passed" in status.reason
    [plan] = plans(actions)
    assert (plan.canary_weight, plan.cohort_names, plan.mirror) == (5, ("internal",), 0)


def test_fewer_copies_than_min_requests_are_inconclusive_never_a_pass() -> None:
    check = MetricCheck.model_validate({"name": "success", "template": "request-success-rate", "min": 99})
    assert judge(check, 100.0, None, 7.0, 20).outcome is INCONCLUSIVE
    assert judge(check, 100.0, None, 20.0, 20).outcome is PASS


def test_a_failing_mirror_step_rolls_back_in_one_plan_without_mirror_cohorts_or_canary() -> None:
    v2, status, now = at_mirror_step()
    status, _ = step(v2, status, WeightAcked("v2", 0, now, ("internal",), 100), now)
    status, actions = step(v2, status, ChecksCompleted(results(FAIL), now + 5), now + 5)
    assert (status.phase, status.mirror, status.cohorts, status.canary) == (Phase.ROLLED_BACK, 0, (), None)
    assert plans(actions) == [TrafficPlan(Backend("v1", spec("v1").endpoints))]


def test_abort_and_promote_stop_mirroring() -> None:
    v2, status, now = at_mirror_step()
    aborted, actions = step(v2, status, Abort("test"), now)
    assert aborted.mirror == 0 and [p.mirror for p in plans(actions)] == [0]
    promoting, actions = step(v2, status, Promote("test"), now)
    assert (promoting.phase, promoting.weight, promoting.mirror) == (Phase.PROMOTING, 100, 0)
    assert [p.mirror for p in plans(actions)] == [0]


def test_a_manual_weight_keeps_the_mirror_and_waits_for_its_ack() -> None:
    v2, status, now = at_mirror_step()
    status, _ = step(v2, status, WeightAcked("v2", 0, now, ("internal",), 100), now)
    status, _ = step(v2, status, SetWeight(10), now)
    assert (status.weight, status.mirror, status.step_started_at) == (10, 100, None)
    status, _ = step(v2, status, WeightAcked("v2", 10, now, ("internal",), 100), now)
    assert status.step_started_at == now


def test_an_edit_that_removes_the_mirror_step_restarts_it_without_mirror() -> None:
    _, status, now = at_mirror_step()
    edited = spec("v2")
    assert edited.strategy is not None
    edited = edited.model_copy(update={"strategy": edited.strategy.model_copy(
        update={"steps": (edited.strategy.steps[0], 3, 5, 20)})})
    status, actions = step(edited, status, SpecObserved(edited), now)
    assert (status.step_index, status.weight, status.mirror) == (1, 3, 0)
    assert [p.mirror for p in plans(actions)] == [0]


@settings(max_examples=150)
@given(script=st.lists(st.sampled_from(["ack", "tick", "pass", "fail", "abort", "promote", "set-weight", "observe-v3"]),
                       max_size=14))
def test_mirroring_happens_only_in_a_mirror_step_and_never_outlives_the_canary(script: list[str]) -> None:
    current, status, now = at_mirror_step()
    for move in script:
        now += 61
        if move == "ack" and status.canary is not None:
            event: Any = WeightAcked(status.canary.version, status.weight, now, status.cohorts, status.mirror)
        elif move in ("pass", "fail"):
            event = ChecksCompleted(results(PASS if move == "pass" else FAIL), now)
        elif move == "abort":
            event = Abort("t")
        elif move == "promote":
            event = Promote("t")
        elif move == "set-weight":
            event = SetWeight(10)
        elif move == "observe-v3":
            current = spec("v3")
            event = SpecObserved(current)
        else:
            event = Tick(now)
        before = status
        status, actions = step(current, status, event, now)
        plan = traffic_plan(current, status)
        assert plan.mirror == status.mirror
        if status.mirror:
            assert status.canary is not None and status.phase in (Phase.PROGRESSING, Phase.PAUSED)
            assert status.mirror == step_mirror(current, status.step_index) == 100
        if status.phase is Phase.ROLLED_BACK and before.phase is not Phase.ROLLED_BACK:
            assert plans(actions) == [plan] and plan.canary is None and plan.mirror == 0  # one plan


def test_the_plan_and_the_status_refuse_a_mirror_without_canary() -> None:
    with pytest.raises(ValueError, match="need a canary"):
        TrafficPlan(V1, None, mirror=50)
    with pytest.raises(ValueError, match="needs a canary"):
        RolloutStatus("checkout", Phase.STABLE, V1, mirror=50)
    assert TrafficPlan(V1, V2, 0).digest != TrafficPlan(V1, V2, 0, mirror=100).digest
    assert traffic_plan(spec("v1"), RolloutStatus("checkout", Phase.STABLE, V1)).mirror == 0


def test_mirroring_more_is_a_move_away_from_stable() -> None:
    before = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 0)
    after = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 0, step_index=1, mirror=100)
    assert moves_away_from_stable(before, after)
    assert not moves_away_from_stable(after, before)


# ---- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["route-", "grpc-"])
def test_the_weighted_default_carries_one_mirror_policy_with_a_runtime_fraction(prefix: str) -> None:
    snapshot = build_snapshot([published(TrafficPlan(V1, V2, 5, mirror=37))])
    assert violations(snapshot) == []
    [route] = routes_of(snapshot, prefix)
    [policy] = route.route.request_mirror_policies
    assert policy.cluster == "checkout_v2"
    fraction = policy.runtime_fraction.default_value
    assert (fraction.numerator, fraction.denominator) == (37, percent_pb2.FractionalPercent.HUNDRED)
    assert not policy.runtime_fraction.runtime_key
    assert [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters] == [
        ("checkout_v1", 95), ("checkout_v2", 5)]
    plain = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 5))]), prefix)
    assert not plain[-1].route.request_mirror_policies


def test_cohort_routes_carry_no_mirror() -> None:
    from tests.unit.test_cohorts import INTERNAL

    routes = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 0, (INTERNAL,), mirror=100))]))
    assert [len(r.route.request_mirror_policies) for r in routes] == [0, 0, 1]


def test_a_mirror_to_a_missing_cluster_is_a_violation() -> None:
    rollout = PublishedRollout("checkout", ListenerSpec(address="127.0.0.1", port=10000), ("*",),
                               (("checkout_v1", 100),), (("checkout_v1", V1),), mirror=("checkout_v9", 100))
    problems = [v.reason for v in violations(build_snapshot([rollout]))]
    assert any("missing cluster 'checkout_v9'" in p for p in problems), problems


@pytest.mark.timeout(120)
def test_mirroring_plans_pass_envoy_validate(tmp_path: Path) -> None:
    assert_envoy_accepts([TrafficPlan(V1, V2, weight, mirror=mirror)
                          for weight, mirror in [(0, 100), (5, 1), (20, 50), (99, 100)]], tmp_path / "mirror.json")


# ---- director, store, admin view ----------------------------------------------------------------


def test_the_director_publishes_and_acks_the_mirror_and_a_rollback_drops_it() -> None:
    director = TrafficDirector(SnapshotCache(), ProxyStatus())
    acked: list[TrafficPlan] = []
    director.on_traffic_acked(lambda name, plan: acked.append(plan))
    director.set_rollout("checkout", Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",)),
                         TrafficPlan(V1, V2, 0))
    director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 0, mirror=100))
    assert acked[-1].mirror == 100  # no proxy: every gate open
    state = director.published_state("checkout")
    assert state is not None and state.mirror == ("checkout_v2", 100)
    director.set_desired_traffic("checkout", TrafficPlan(V1))
    state = director.published_state("checkout")
    assert state is not None and state.mirror is None and state.route == (("checkout_v1", 100),)


def test_published_mirror_and_status_survive_the_store_and_old_rows_load() -> None:
    saved = SavedPublished((("checkout_v1", 100), ("checkout_v2", 0)), (("checkout_v1", V1), ("checkout_v2", V2)),
                           mirror=("checkout_v2", 100))
    assert decode_published(encode_published(saved)) == saved
    status = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 0, step_index=1, mirror=100, acked_mirror=100)
    assert _STATUS.validate_json(_STATUS.dump_json(status)) == status
    legacy = json.loads(_STATUS.dump_json(status))
    del legacy["mirror"], legacy["acked_mirror"]
    assert (_STATUS.validate_python(legacy).mirror, _STATUS.validate_python(legacy).acked_mirror) == (0, 0)


def test_status_json_watch_and_events_show_the_mirror() -> None:
    v2, status, now = at_mirror_step()
    clock = WallClock(0.0, 0.0)
    message = rollout_message(status, v2, [], clock)
    assert (message.mirror, message.acked_mirror) == (100, 0)  # the cohort step's plan is what Envoy has
    status, actions = step(v2, status, WeightAcked("v2", 0, now, ("internal",), 100), now)
    message = rollout_message(status, v2, [], clock)
    assert (message.mirror, message.acked_mirror) == (100, 100)
    assert "canary v2 at 0% and cohorts internal, mirroring 100%" in rollout_line(message)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(rollout_detail(message))
    assert "100% of the split copied to v2" in console.export_text()
    [record] = [a.event for a in actions if isinstance(a, RecordEvent)]
    event = event_message(record, clock)
    assert event.mirror == 100 and "mirroring 100%" in event_line(event)
    assert apply_event(None, event).mirror == 100
    console.print(watch_view({"checkout": message}, [event]))
    assert "mirror 100%" in console.export_text()
    assert {k: json.loads(as_json(message))[k] for k in ("mirror", "acked_mirror")} == {
        "mirror": 100, "acked_mirror": 100}  # `aviary status -o json`
    rolled_back, _ = step(v2, status, Abort("test"), now)
    assert rollout_message(rolled_back, v2, [], clock).mirror == 0


def test_metrics_have_a_mirror_gauge() -> None:
    from typing import cast

    from aviary.observability import _StateCollector
    from aviary.runner import RolloutRunner

    class Runner:
        revision = None

        def statuses(self) -> dict[str, RolloutStatus]:
            return {"checkout": RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 0, step_index=1,
                                              cohorts=("internal",), mirror=100)}

        def stage(self, name: str) -> str | None:
            return "shifting"

        def plan(self, name: str) -> TrafficPlan | None:
            return TrafficPlan(V1, V2, 0, mirror=100, stickiness=Stickiness(header="x-user-id"))

    # The rollout families come before those that need more of a runner than this stub has.
    families = _StateCollector(ProxyStatus(), cast(RolloutRunner, Runner())).collect()
    gauge = next(m for m in families if m.name == "aviary_rollout_mirror_percent")
    [sample] = gauge.samples
    assert (sample.labels, sample.value) == ({"rollout": "checkout"}, 100)
    # The rest of the plan: opened cohorts, the make-before-break stage and the plan's digest.
    by_name = {}
    for family in _StateCollector(ProxyStatus(), cast(RolloutRunner, Runner())).collect():
        by_name[family.name] = family
        if family.name == "aviary_check_result":  # the last rollout family; later ones need more of a runner
            break
    assert [(s.labels, s.value) for s in by_name["aviary_rollout_cohort_open"].samples] == [
        ({"rollout": "checkout", "cohort": "internal"}, 1.0)]
    stages = {s.labels["stage"]: s.value for s in by_name["aviary_rollout_stage"].samples}
    assert stages == {"adding": 0, "shifting": 1, "retiring": 0, "removing": 0, "settled": 0}
    [info] = by_name["aviary_rollout_plan"].samples
    plan = TrafficPlan(V1, V2, 0, mirror=100, stickiness=Stickiness(header="x-user-id"))
    assert info.labels == {"rollout": "checkout", "digest": plan.digest, "stickiness": "header x-user-id"}


def test_status_shows_the_plan_digest_and_its_make_before_break_stage() -> None:
    v2, status, _ = at_mirror_step()
    plan = traffic_plan(v2, status)
    message = rollout_message(status, v2, [], WallClock(0.0, 0.0), plan=plan, stage="shifting")
    assert (message.plan, message.stage) == (plan.digest, "shifting")
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(rollout_detail(message))
    assert f"{plan.digest} (shifting)" in console.export_text()
    assert {k: json.loads(as_json(message))[k] for k in ("plan", "stage")} == {"plan": plan.digest, "stage": "shifting"}
