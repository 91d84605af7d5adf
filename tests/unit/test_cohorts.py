"""Cohorts by header and cookie: the schema, the pure engine, the plan's rendering and its storage.

Cookie conditions are rendered as a regex on the whole `cookie` header; a property test checks,
against a model of cookie headers, that the regex matches exactly when the named cookie is there
with a value meeting the condition (never a neighbour's value). A sample of rendered plans is
checked by `envoy --mode validate`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviary.admin.convert import WallClock, event_message, rollout_message
from aviary.admin.render import event_line, rollout_line
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, PublishedState, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import _cookie_matcher, build_snapshot, violations
from aviary.matching import CohortRule, Condition, Match, cookie_regex_problem, re2_problem
from aviary.policy.rollout import (
    Abort,
    Phase,
    Promote,
    RolloutStatus,
    SpecObserved,
    Tick,
    WeightAcked,
    step,
    traffic_plan,
)
from aviary.policy.schema import ListenerSpec, PolicySet, RolloutSpec
from aviary.runner import RolloutRunner
from aviary.store.sqlite import _STATUS, SavedPublished, SavedRollout, decode_published, encode_published
from aviary.traffic import Backend, TrafficPlan
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
          - cookies: {beta: {exact: "1"}}
      - name: eu-mobile
        match:
          - headers: {x-country: {regex: "DE|FR|NL"}, user-agent: {contains: Mobile}}
      - name: anonymous
        match:
          - headers: {authorization: {absent: true}}
    steps:
      - {cohorts: [internal]}
      - {cohorts: [eu-mobile, anonymous]}
      - 5
      - 20
      - 50
    interval: 10m
"""

INTERNAL = CohortRule("internal", (Match(headers=(("x-team", Condition("exact", "qa")),)),
                                   Match(cookies=(("beta", Condition("exact", "1")),))))


# ---- schema -------------------------------------------------------------------------------------


def test_the_issue_spelling_parses_and_round_trips_through_the_store() -> None:
    rollout, errors = parse(ISSUE_POLICY)
    assert errors == []
    strategy = rollout.spec.strategy
    assert [c.name for c in strategy.cohorts] == ["internal", "eu-mobile", "anonymous"]
    assert strategy.cohort("internal") == INTERNAL
    eu = strategy.cohort("eu-mobile").match[0]
    assert eu.headers == (("x-country", Condition("regex", "DE|FR|NL")),
                          ("user-agent", Condition("contains", "Mobile")))
    assert type(rollout).model_validate_json(rollout.model_dump_json(by_alias=True)) == rollout


@pytest.mark.parametrize(("old", "new", "error"), [
    ('regex: "DE|FR|NL"', 'regex: "(a)\\\\1"',
     "spec.strategy.cohorts[1].match[0].headers.x-country.regex: RE2 (what Envoy runs) has no backreferences"),
    ('regex: "DE|FR|NL"', 'regex: "(?=DE)"', "spec.strategy.cohorts[1].match[0].headers.x-country.regex: RE2"),
    ('regex: "DE|FR|NL"', 'regex: "(DE"', "spec.strategy.cohorts[1].match[0].headers.x-country.regex: invalid"),
    ("[eu-mobile, anonymous]", "[eu-mobile, nobody]",
     "spec.strategy.steps[1].cohorts[1]: unknown cohort 'nobody' (known: internal, eu-mobile, anonymous)"),
    ("- 5\n", "- {cohorts: [internal]}\n", "spec.strategy.steps[2].cohorts[0]: cohort 'internal' is already open"),
    ("absent: true", "absent: false", "spec.strategy.cohorts[2].match[0].headers.authorization.absent: must be true"),
    ("exact: qa", "exakt: qa", "spec.strategy.cohorts[0].match[0].headers.x-team.exakt: unknown condition"),
    ('exact: "1"', 'regex: "[^;]+"', "spec.strategy.cohorts[0].match[1].cookies.beta.regex: a cookie regex may not"),
    ('exact: "1"', 'exact: "a;b"', "spec.strategy.cohorts[0].match[1].cookies.beta.exact: a cookie value never"),
    ("name: anonymous", "name: internal", "spec.strategy.cohorts[2].name: duplicate cohort 'internal'"),
    ("- headers: {x-team", "- headerz: {x-team", "spec.strategy.cohorts[0].match[0].headerz: unknown field"),
    ("{x-team: {exact: qa}}", "{x team: {exact: qa}}", "spec.strategy.cohorts[0].match[0].headers.x team: invalid"),
])
def test_bad_cohorts_give_one_line_naming_file_and_field(old: str, new: str, error: str) -> None:
    assert old in ISSUE_POLICY
    _, errors = parse(ISSUE_POLICY.replace(old, new, 1))
    assert len(errors) == 1 and errors[0].startswith(f"checkout.yaml: {error}"), errors


@pytest.mark.parametrize("pattern", ["a\\2", "(?<=x)y", "(?<!x)y", "(?!x)", "(?>a)", "a*+", "(?P<n>a)(?P=n)", "a\\Z"])
def test_re2_lacks(pattern: str) -> None:
    assert re2_problem(pattern) is not None


@pytest.mark.parametrize("pattern", ["DE|FR|NL", "^v[0-9]+$", "(?i)mobile", "a{2,3}", "[a-z]+\\.example"])
def test_re2_has(pattern: str) -> None:
    assert re2_problem(pattern) is None


# ---- cookie regexes, against a model of the cookie header ----------------------------------------

NAMES = st.sampled_from(["beta", "b", "xbeta", "beta2", "a.b", "sess"])
VALUES = st.text(alphabet="01ab=.-_ ", max_size=5).map(str.strip)
CONDITIONS = st.one_of(
    st.builds(Condition, st.sampled_from(["exact", "prefix", "suffix", "contains"]), st.text("01ab.", max_size=3)),
    st.builds(Condition, st.just("regex"), st.sampled_from(["1", "a.", "(0|1)+", "b*", "[ab]1"])),
    st.builds(Condition, st.sampled_from(["present", "absent"])),
)


def holds(condition: Condition, value: str | None) -> bool:
    if condition.kind == "absent":
        return value is None
    if value is None:
        return False
    return {
        "present": lambda: True,
        "exact": lambda: value == condition.value,
        "prefix": lambda: value.startswith(condition.value),
        "suffix": lambda: value.endswith(condition.value),
        "contains": lambda: condition.value in value,
        "regex": lambda: re.fullmatch(condition.value, value) is not None,
    }[condition.kind]()


@settings(max_examples=400)
@given(name=NAMES, condition=CONDITIONS, cookies=st.lists(st.tuples(NAMES, VALUES), max_size=4),
       separator=st.sampled_from(["; ", ";"]), missing=st.booleans())
def test_a_cookie_condition_matches_exactly_its_own_cookie(
        name: str, condition: Condition, cookies: list[tuple[str, str]], separator: str, missing: bool) -> None:
    if condition.kind == "regex":
        assert cookie_regex_problem(condition.value) is None
    matcher = _cookie_matcher(name, condition)
    assert matcher.treat_missing_header_as_empty
    header = "" if missing else separator.join(f"{n}={v}" for n, v in cookies)
    values = [] if missing else [v for n, v in cookies if n == name]
    # Several cookies of one name: a browser sends each; the condition holds if any value does.
    expected = (not values) if condition.kind == "absent" else any(holds(condition, v) for v in values)
    found = re.fullmatch(matcher.string_match.safe_regex.regex, header) is not None
    assert (found != matcher.invert_match) == expected, (header, matcher.string_match.safe_regex.regex)


# ---- the pure engine ----------------------------------------------------------------------------


def spec(version: str, steps: list[Any] | None = None) -> RolloutSpec:
    result = spec_of(ISSUE_POLICY.replace("version: v2", f"version: {version}"))
    if steps is not None:
        assert result.strategy is not None
        result = result.model_copy(update={"strategy": result.strategy.model_copy(update={"steps": tuple(steps)})})
    return result


def canary_at_first_step() -> tuple[RolloutSpec, RolloutStatus, float]:
    v1, v2 = spec("v1"), spec("v2")
    status, _ = step(v1, None, SpecObserved(v1), 0.0, rollout="checkout")
    status, actions = step(v2, status, SpecObserved(v2), 1.0)
    assert (status.phase, status.weight, status.cohorts) == (Phase.PROGRESSING, 0, ("internal",))
    [plan] = plans(actions)
    assert plan.canary_weight == 0 and plan.cohort_names == ("internal",)
    assert status.step_started_at is None  # waits for the ACK of the whole plan
    return v2, status, 1.0


def test_a_cohort_step_starts_only_when_its_cohorts_are_acked() -> None:
    v2, status, now = canary_at_first_step()
    status, _ = step(v2, status, WeightAcked("v2", 0, now), now)  # weight 0 ACKed, cohorts not yet
    assert status.step_started_at is None
    status, _ = step(v2, status, WeightAcked("v2", 0, now, ("internal",)), now)
    assert status.step_started_at == now
    assert "0% and cohorts internal to v2 ACKed" in status.reason


def test_cohorts_accumulate_and_stay_open_through_weight_steps() -> None:
    v2, status, now = canary_at_first_step()
    opened = []
    for _ in range(4):
        status, _ = step(v2, status, WeightAcked("v2", status.weight, now, status.cohorts), now)
        now += 600
        status, _ = step(v2, status, Tick(now), now)
        opened.append((status.weight, status.cohorts))
    assert opened == [(0, ("internal", "eu-mobile", "anonymous")), (5, ("internal", "eu-mobile", "anonymous")),
                      (20, ("internal", "eu-mobile", "anonymous")), (50, ("internal", "eu-mobile", "anonymous"))]
    assert traffic_plan(v2, status).cohort_names == ("internal", "eu-mobile", "anonymous")


def test_rollback_closes_every_cohort_in_one_plan() -> None:
    v2, status, now = canary_at_first_step()
    status, actions = step(v2, status, Abort("test"), now)
    assert (status.phase, status.cohorts) == (Phase.ROLLED_BACK, ())
    assert plans(actions) == [TrafficPlan(Backend("v1", spec("v1").endpoints))]


def test_promotion_closes_the_cohorts() -> None:
    v2, status, now = canary_at_first_step()
    status, actions = step(v2, status, Promote("test"), now)
    assert (status.phase, status.weight, status.cohorts) == (Phase.PROMOTING, 100, ())
    [plan] = plans(actions)
    assert plan.cohorts == () and plan.canary_weight == 100


@settings(max_examples=150)
@given(script=st.lists(st.sampled_from(["ack", "tick", "abort", "promote", "observe-v3"]), max_size=12))
def test_cohorts_are_those_of_the_steps_so_far_and_none_without_a_canary(script: list[str]) -> None:
    current, status, now = canary_at_first_step()
    for move in script:
        now += 601
        if move == "ack" and status.canary is not None:
            event: Any = WeightAcked(status.canary.version, status.weight, now, status.cohorts)
        elif move == "abort":
            event = Abort("t")
        elif move == "promote":
            event = Promote("t")
        elif move == "observe-v3":
            current = spec("v3")
            event = SpecObserved(current)
        else:
            event = Tick(now)
        before = status
        status, actions = step(current, status, event, now)
        plan = traffic_plan(current, status)
        if status.canary is None or status.phase is Phase.PROMOTING:
            assert status.cohorts == () and plan.cohorts == ()
        if status.phase is Phase.ROLLED_BACK and before.phase is not Phase.ROLLED_BACK:
            assert plans(actions) == [plan] and plan.canary is None  # one plan: cohorts closed, 100 % stable
        assert set(status.cohorts) <= {"internal", "eu-mobile", "anonymous"}


# ---- rendering ----------------------------------------------------------------------------------


def test_cohort_routes_come_first_one_per_entry_conditions_anded() -> None:
    eu = CohortRule("eu-mobile", (Match(headers=(("x-country", Condition("regex", "DE|FR")),
                                                 ("user-agent", Condition("contains", "Mobile")))),))
    routes = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 0, (INTERNAL, eu)))]))
    assert [r.route.cluster for r in routes] == ["checkout_v2", "checkout_v2", "checkout_v2", ""]
    headers = [[h.name for h in r.match.headers] for r in routes]
    assert headers == [["x-team"], ["cookie"], ["x-country", "user-agent"], []]
    assert routes[0].match.headers[0].string_match.exact == "qa"
    assert [(c.name, c.weight.value) for c in routes[-1].route.weighted_clusters.clusters] == [
        ("checkout_v1", 100), ("checkout_v2", 0)]


CONDITION_TEXT = st.text(alphabet="abcXYZ019-_.", min_size=1, max_size=6)
ANY_CONDITION = st.one_of(
    st.builds(Condition, st.sampled_from(["exact", "prefix", "suffix", "contains"]), CONDITION_TEXT),
    st.builds(Condition, st.just("regex"), st.sampled_from(["DE|FR|NL", "^v[0-9]+$", "a.b", "(x|y){1,3}"])),
    st.builds(Condition, st.sampled_from(["present", "absent"])),
)
PAIRS = st.lists(st.tuples(st.sampled_from(["x-team", "user-agent", "x-a.b", "authorization"]), ANY_CONDITION),
                 max_size=3, unique_by=lambda p: p[0]).map(tuple)
COOKIE_PAIRS = st.lists(st.tuples(st.sampled_from(["beta", "s.id", "a+b"]), ANY_CONDITION),
                        max_size=2, unique_by=lambda p: p[0]).map(tuple)
MATCHES = st.builds(Match, PAIRS, COOKIE_PAIRS).filter(lambda m: bool(m.headers or m.cookies))
COHORTS = st.lists(st.builds(CohortRule, st.sampled_from(["a", "b", "c"]), st.lists(MATCHES, min_size=1, max_size=3)
                             .map(tuple)), max_size=3, unique_by=lambda c: c.name).map(tuple)
SAMPLES: list[TrafficPlan] = []


@settings(max_examples=200)
@given(cohorts=COHORTS, weight=st.integers(0, 100))
def test_every_plan_renders_to_routes_the_checker_accepts(cohorts: tuple[CohortRule, ...], weight: int) -> None:
    plan = TrafficPlan(V1, V2, weight, cohorts)
    snapshot = build_snapshot([published(plan)])
    assert violations(snapshot) == []
    routes = routes_of(snapshot)
    assert len(routes) == sum(len(c.match) for c in cohorts) + 1
    if len(SAMPLES) < 12 and cohorts:
        SAMPLES.append(plan)


@pytest.mark.timeout(120)
def test_a_sample_of_plans_passes_envoy_validate(tmp_path: Path) -> None:
    if not SAMPLES:
        pytest.skip("run with test_every_plan_renders_to_routes_the_checker_accepts first (same module)")
    assert_envoy_accepts(SAMPLES, tmp_path / "plans.json")


def test_plan_digest_is_by_content() -> None:
    assert TrafficPlan(V1, V2, 20, (INTERNAL,)).digest == TrafficPlan(V1, V2, 20, (INTERNAL,)).digest
    assert TrafficPlan(V1, V2, 20, (INTERNAL,)).digest != TrafficPlan(V1, V2, 20).digest
    with pytest.raises(ValueError, match="need a canary"):
        TrafficPlan(V1, None, 0, (INTERNAL,))


# ---- director, store, status --------------------------------------------------------------------


def test_the_director_acks_a_plan_only_with_its_cohorts() -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    acked: list[TrafficPlan] = []
    director.on_traffic_acked(lambda name, plan: acked.append(plan))
    placement = Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",))
    director.set_rollout("checkout", placement, TrafficPlan(V1, V2, 0))
    director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 0, (INTERNAL,)))
    assert acked[-1] == TrafficPlan(V1, V2, 0, (INTERNAL,))  # no proxy: every gate open
    state = director.published_state("checkout")
    assert state is not None and state.cohorts == ((INTERNAL, "checkout_v2"),)
    director.set_desired_traffic("checkout", TrafficPlan(V1))  # rollback: cohorts go with the canary's weight
    state = director.published_state("checkout")
    assert state is not None and state.cohorts == () and state.route == (("checkout_v1", 100),)


def test_published_state_with_cohorts_survives_the_store_and_old_rows_load() -> None:
    saved = SavedPublished((("checkout_v1", 100), ("checkout_v2", 0)), (("checkout_v1", V1), ("checkout_v2", V2)),
                           ((INTERNAL, "checkout_v2"),))
    assert decode_published(encode_published(saved)) == saved
    old = json.dumps({"route": [["checkout_v1", 100]], "clusters": [["checkout_v1", {"version": "v1",
                      "endpoints": ["127.0.0.1:9001"]}]]})
    assert decode_published(old).cohorts == ()
    status = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 20, cohorts=("internal",))
    assert _STATUS.validate_json(_STATUS.dump_json(status)) == status
    legacy = json.loads(_STATUS.dump_json(status))
    del legacy["cohorts"], legacy["acked_cohorts"]
    assert _STATUS.validate_python(legacy).cohorts == ()
    assert isinstance(PublishedState((), ()).cohorts, tuple)


def test_status_and_watch_lines_show_opened_cohorts() -> None:
    v2, status, now = canary_at_first_step()
    message = rollout_message(status, v2, [], WallClock(0.0, 0.0))
    assert list(message.cohorts) == ["internal"]
    assert "canary v2 at 0% and cohorts internal" in rollout_line(message)
    _, status, now = canary_at_first_step()
    status, actions = step(v2, status, WeightAcked("v2", 0, now, ("internal",)), now)
    event = [a.event for a in actions if hasattr(a, "event")][-1]
    assert event.cohorts == ("internal",)
    assert "and cohorts internal" in event_line(event_message(event, WallClock(0.0, 0.0)))


# ---- the runner: restart and edited cohorts -----------------------------------------------------


def test_an_edited_opened_cohort_is_published_and_a_restart_restores_the_cohorts() -> None:
    director = TrafficDirector(SnapshotCache(), ProxyStatus())
    runner = RolloutRunner(director, clock=lambda: 1000.0)
    for text in (ISSUE_POLICY.replace("version: v2", "version: v1"), ISSUE_POLICY):
        rollout, errors = parse(text)
        assert not errors
        runner.apply_policies(PolicySet({"checkout": rollout}, {"checkout": "checkout.yaml"}))
    desired = director.desired("checkout")
    assert desired is not None and desired.cohort_names == ("internal",)

    edited, errors = parse(ISSUE_POLICY.replace("exact: qa", "exact: qa-team"))
    assert not errors
    runner.apply_policies(PolicySet({"checkout": edited}, {"checkout": "checkout.yaml"}))
    desired = director.desired("checkout")
    assert desired is not None  # the status did not change; the plan did, and is published
    assert desired.cohorts[0].match[0].headers == (("x-team", Condition("exact", "qa-team")),)

    status = runner.status("checkout")
    assert status is not None and status.cohorts == ("internal",)
    saved = _STATUS.validate_json(_STATUS.dump_json(status))  # as the store saves and loads it
    again = TrafficDirector(SnapshotCache(), ProxyStatus())
    restarted = RolloutRunner(again, clock=lambda: 2000.0)
    restarted.restore({"checkout": SavedRollout(saved, edited, 1000.0, None, ())}, last_alive=1000.0)
    restored = again.desired("checkout")
    assert restored is not None and restored.cohorts == desired.cohorts and restored.canary_weight == 0
