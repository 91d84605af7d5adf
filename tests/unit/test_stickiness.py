"""Sticky users and query-parameter cohort conditions: schema, plan, rendering, storage, status.

The cookie-issuing route matches "no non-empty cookie of that name" with a regex on the whole
`cookie` header; a property test checks it against a model of cookie headers (Envoy parses the
cookie the same way: an empty value counts as absent). A sample of rendered plans is checked by
`envoy --mode validate`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from aviary.admin.convert import WallClock, event_message, rollout_message
from aviary.admin.render import apply_event, as_json, rollout_line, watch_view
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import ISSUED_COOKIE_SOURCE, build_snapshot, violations
from aviary.matching import CohortRule, Condition, Match
from aviary.policy.rollout import Abort, Phase, RolloutStatus, SetTraffic, SpecObserved, WeightAcked, step, traffic_plan
from aviary.policy.schema import PolicySet, RolloutSpec
from aviary.runner import RolloutRunner
from aviary.store.sqlite import SavedPublished, decode_published, encode_published
from aviary.traffic import Backend, Stickiness, TrafficPlan
from tests.unit.builders import V1, V2, assert_envoy_accepts, parse, published, routes_of, spec_of

POLICY = """\
apiVersion: aviary.dev/v1
kind: Rollout
metadata: {name: checkout}
spec:
  listener: {port: 10000}
  hosts: ["*"]
  version: v2
  endpoints: ["10.0.0.8:8080"]
  strategy:
    stickiness: {header: X-User-Id}
    cohorts:
      - name: beta
        match:
          - query: {beta: {exact: "1"}}
          - headers: {x-team: {exact: qa}}
            query: {preview: {present: true}, v: {regex: "[0-9]+"}}
    steps: [{cohorts: [beta]}, 5, 20, 50]
    interval: 10m
"""

BETA = CohortRule("beta", (Match(query=(("beta", Condition("exact", "1")),)),))
BY_HEADER = Stickiness(header="x-user-id")
BY_COOKIE = Stickiness(cookie="session", ttl=86400.0)


def spec(version: str = "v2", sticky: str = "{header: X-User-Id}") -> RolloutSpec:
    return spec_of(POLICY.replace("version: v2", f"version: {version}").replace("{header: X-User-Id}", sticky))


# ---- schema -------------------------------------------------------------------------------------


def test_the_issue_spelling_parses_and_round_trips_through_the_store() -> None:
    rollout, errors = parse(POLICY)
    assert errors == []
    strategy = rollout.spec.strategy
    assert strategy.stickiness.header == "x-user-id" and strategy.stickiness.cookie is None  # lower-cased
    [by_query, anded] = strategy.cohort("beta").match
    assert by_query == Match(query=(("beta", Condition("exact", "1")),))
    assert anded.headers == (("x-team", Condition("exact", "qa")),)
    assert anded.query == (("preview", Condition("present")), ("v", Condition("regex", "[0-9]+")))
    assert type(rollout).model_validate_json(rollout.model_dump_json(by_alias=True)) == rollout

    cookie, errors = parse(POLICY.replace("{header: X-User-Id}", "{cookie: {name: session, ttl: 24h}}"))
    assert errors == []
    assert cookie.spec.strategy.stickiness.cookie.name == "session"
    assert cookie.spec.strategy.stickiness.cookie.ttl == 86400.0
    assert type(cookie).model_validate_json(cookie.model_dump_json(by_alias=True)) == cookie
    no_ttl, errors = parse(POLICY.replace("{header: X-User-Id}", "{cookie: {name: session}}"))
    assert errors == [] and no_ttl.spec.strategy.stickiness.cookie.ttl is None


STICKY = "spec.strategy.stickiness"
QUERY = "spec.strategy.cohorts[0].match[0].query"


@pytest.mark.parametrize(("old", "new", "error"), [
    ("{header: X-User-Id}", "{header: x-user-id, cookie: {name: s}}", f"{STICKY}: give exactly one of header"),
    ("{header: X-User-Id}", "{}", f"{STICKY}: give exactly one of header"),
    ("{header: X-User-Id}", "x-user-id", f"{STICKY}: expected {{header: x-user-id}} or {{cookie:"),
    ("{header: X-User-Id}", "{header: 'x user'}", f"{STICKY}.header: invalid header name 'x user'"),
    ("{header: X-User-Id}", "{header: 7}", f"{STICKY}.header: input should be a valid string"),
    ("{header: X-User-Id}", "{headers: x}", f"{STICKY}.headers: unknown field 'headers' (did you mean 'header'?)"),
    ("{header: X-User-Id}", "{cookie: {name: 's%1', ttl: 1h}}", f"{STICKY}.cookie.name: invalid cookie name 's%1'"),
    ("{header: X-User-Id}", "{cookie: {ttl: 1h}}", f"{STICKY}.cookie.name: required field is missing"),
    ("{header: X-User-Id}", "{cookie: {name: s, ttl: 1d}}", f"{STICKY}.cookie.ttl: invalid duration '1d'"),
    ("{header: X-User-Id}", "{cookie: {name: s, ttl: 0s}}", f"{STICKY}.cookie.ttl: duration must be greater than"),
    ("{header: X-User-Id}", "{cookie: {name: s, ttl: 1500ms}}", f"{STICKY}.cookie.ttl: must be whole seconds"),
    ("{header: X-User-Id}", "{cookie: {name: s, ttl: 1h, path: /}}", f"{STICKY}.cookie.path: unknown field"),
    ('{beta: {exact: "1"}}', "{beta: {absent: true}}", f"{QUERY}.beta.absent: a query parameter cannot be tested"),
    ('{beta: {exact: "1"}}', "{beta: {exakt: '1'}}", f"{QUERY}.beta.exakt: unknown condition 'exakt'"),
    ('{beta: {exact: "1"}}', "{beta: {exact: 'a&b'}}", f"{QUERY}.beta.exact: a query parameter value never"),
    ('{beta: {exact: "1"}}', "{beta: {regex: '(?=a)'}}", f"{QUERY}.beta.regex: RE2 (what Envoy runs) has no"),
    ('{beta: {exact: "1"}}', "{'be ta': {exact: '1'}}", f"{QUERY}.be ta: invalid query parameter name"),
    ('{beta: {exact: "1"}}', "{}", f"{QUERY}: expected a map of query parameter name to condition"),
    ('{beta: {exact: "1"}}', "{beta: {present: false}}", f"{QUERY}.beta.present: must be true"),
    ("- query: {beta", "- querry: {beta", "spec.strategy.cohorts[0].match[0].querry: unknown field 'querry' "
                                          "(headers, cookies, query)"),
])
def test_bad_stickiness_and_query_conditions_give_one_line_naming_the_field(old: str, new: str, error: str) -> None:
    assert old in POLICY
    _, errors = parse(POLICY.replace(old, new, 1))
    assert len(errors) == 1 and errors[0].startswith(f"checkout.yaml: {error}"), errors
    assert "\n" not in errors[0]


# ---- the plan -----------------------------------------------------------------------------------


def test_the_plan_is_sticky_only_while_a_canary_runs() -> None:
    v1, v2 = spec("v1"), spec("v2")
    status, actions = step(v1, None, SpecObserved(v1), 0.0, rollout="checkout")
    assert traffic_plan(v1, status).stickiness is None  # one cluster: nothing to hash
    status, actions = step(v2, status, SpecObserved(v2), 1.0)
    [plan] = [a.traffic for a in actions if isinstance(a, SetTraffic)]
    assert plan.stickiness == BY_HEADER and plan.cohorts[0].name == "beta"
    status, actions = step(v2, status, WeightAcked("v2", 0, 1.0, ("beta",)), 1.0)
    status, actions = step(v2, status, Abort("test"), 2.0)
    [rollback] = [a.traffic for a in actions if isinstance(a, SetTraffic)]
    assert status.phase is Phase.ROLLED_BACK
    assert rollback == TrafficPlan(Backend("v1", v1.endpoints))  # one plan: no canary, cohort or hash
    cookie = spec("v2", "{cookie: {name: session, ttl: 24h}}")
    running = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 20)
    assert traffic_plan(cookie, running).stickiness == BY_COOKIE


def test_digests_of_plans_without_the_new_fields_are_unchanged() -> None:
    internal = CohortRule("internal", (Match(headers=(("x-team", Condition("exact", "qa")),)),
                                       Match(cookies=(("beta", Condition("exact", "1")),))))
    assert TrafficPlan(V1, V2, 20, (internal,)).digest == "9a378543bee1"  # as computed before query existed
    assert repr(Match()) == "Match(headers=(), cookies=())"
    assert TrafficPlan(V1, V2, 20, (BETA,)).digest != TrafficPlan(V1, V2, 20).digest
    assert TrafficPlan(V1, V2, 20, stickiness=BY_HEADER).digest != TrafficPlan(V1, V2, 20).digest
    assert "sticky by header x-user-id" in TrafficPlan(V1, V2, 20, stickiness=BY_HEADER).describe()


# ---- rendering ----------------------------------------------------------------------------------


def test_header_stickiness_hashes_the_weighted_default_with_the_canary_last() -> None:
    routes = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 20, (BETA,), BY_HEADER))]))
    assert len(routes) == 2
    cohort, weighted = routes
    assert cohort.route.cluster == "checkout_v2" and not cohort.route.hash_policy  # one cluster: no hash
    action = weighted.route
    assert [p.header.header_name for p in action.hash_policy] == ["x-user-id"]
    assert action.weighted_clusters.use_hash_policy.value is True
    assert [(c.name, c.weight.value) for c in action.weighted_clusters.clusters] == [
        ("checkout_v1", 80), ("checkout_v2", 20)]


def test_without_stickiness_the_route_is_as_before() -> None:
    [weighted] = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 20))]))
    assert not weighted.route.hash_policy and not weighted.route.weighted_clusters.HasField("use_hash_policy")


def test_an_issued_cookie_gets_a_route_for_requests_without_it() -> None:
    routes = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 20, (BETA,), BY_COOKIE))]))
    assert len(routes) == 3
    _, issuing, weighted = routes
    assert [p.cookie.name for p in weighted.route.hash_policy] == ["session"]
    assert not weighted.route.hash_policy[0].cookie.HasField("ttl")  # Envoy would not issue it from here
    assert weighted.route.weighted_clusters.use_hash_policy.value is True
    [without] = issuing.match.headers
    assert (without.name, without.invert_match, without.treat_missing_header_as_empty) == ("cookie", True, True)
    assert [p.header.header_name for p in issuing.route.hash_policy] == [ISSUED_COOKIE_SOURCE]
    assert issuing.route.weighted_clusters.use_hash_policy.value is True
    assert [(c.name, c.weight.value) for c in issuing.route.weighted_clusters.clusters] == [
        ("checkout_v1", 80), ("checkout_v2", 20)]
    [added] = issuing.response_headers_to_add
    assert (added.header.key, added.header.value) == (
        "set-cookie", "session=%REQ(x-request-id)%; Max-Age=86400; Path=/; HttpOnly")

    no_ttl = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 20, (), Stickiness(cookie="session")))]))
    assert len(no_ttl) == 1 and no_ttl[0].route.hash_policy[0].cookie.name == "session"  # the app sets it


COOKIE_NAMES = st.sampled_from(["session", "s", "xsession", "session2", "a.b"])
COOKIE_VALUES = st.text(alphabet="01ab=.-_ ", max_size=4).map(str.strip)


@settings(max_examples=300)
@given(cookies=st.lists(st.tuples(COOKIE_NAMES, COOKIE_VALUES), max_size=4),
       separator=st.sampled_from(["; ", ";"]), missing=st.booleans())
def test_the_issuing_route_takes_exactly_the_requests_without_a_non_empty_cookie(
        cookies: list[tuple[str, str]], separator: str, missing: bool) -> None:
    routes = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 20, (), BY_COOKIE))]))
    [matcher] = routes[0].match.headers
    header = "" if missing else separator.join(f"{n}={v}" for n, v in cookies)
    has_cookie = not missing and any(n == "session" and v for n, v in cookies)
    found = re.fullmatch(matcher.string_match.safe_regex.regex, header) is not None
    assert (found != matcher.invert_match) == (not has_cookie), (header, matcher.string_match.safe_regex.regex)


def test_query_conditions_render_as_query_parameter_matchers() -> None:
    rule = CohortRule("beta", (Match(headers=(("x-team", Condition("exact", "qa")),),
                                     query=(("beta", Condition("exact", "1")), ("p", Condition("present")),
                                            ("v", Condition("regex", "[0-9]+")), ("s", Condition("suffix", "x")))),))
    [cohort, _] = routes_of(build_snapshot([published(TrafficPlan(V1, V2, 0, (rule,)))]))
    assert [h.name for h in cohort.match.headers] == ["x-team"]  # AND: one route, both kinds of matcher
    beta, p, v, s = cohort.match.query_parameters
    assert (beta.name, beta.string_match.exact) == ("beta", "1")
    assert (p.name, p.present_match) == ("p", True)
    assert (v.name, v.string_match.safe_regex.regex) == ("v", "[0-9]+")
    assert (s.name, s.string_match.suffix) == ("s", "x")
    assert cohort.route.cluster == "checkout_v2"


def test_proxyless_grpc_clients_get_the_same_virtual_host() -> None:
    snapshot = build_snapshot([published(TrafficPlan(V1, V2, 20, (BETA,), BY_COOKIE))])
    assert routes_of(snapshot, "grpc-") == routes_of(snapshot, "route-")


PLANS = st.builds(
    TrafficPlan, st.just(V1), st.just(V2), st.integers(0, 100),
    st.lists(st.builds(CohortRule, st.sampled_from(["a", "b"]), st.just((
        Match(query=(("beta", Condition("exact", "1")), ("p", Condition("present")))),
        Match(headers=(("x", Condition("prefix", "y")),), query=(("q", Condition("regex", "a|b")),)),
    ))), max_size=2, unique_by=lambda c: c.name).map(tuple),
    st.sampled_from([None, BY_HEADER, BY_COOKIE, Stickiness(cookie="s.id"), Stickiness(header="cookie")]),
)
SAMPLES: list[TrafficPlan] = []


@settings(max_examples=150)
@given(plan=PLANS)
def test_every_sticky_plan_renders_to_routes_the_checker_accepts(plan: TrafficPlan) -> None:
    snapshot = build_snapshot([published(plan)])
    assert violations(snapshot) == []
    if len(SAMPLES) < 12 and (plan.stickiness or plan.cohorts):
        SAMPLES.append(plan)


@pytest.mark.timeout(120)
def test_a_sample_of_sticky_plans_passes_envoy_validate(tmp_path: Path) -> None:
    if not SAMPLES:
        pytest.skip("run with test_every_sticky_plan_renders_to_routes_the_checker_accepts first (same module)")
    assert_envoy_accepts(SAMPLES, tmp_path / "plans.json")


# ---- store, runner, status ----------------------------------------------------------------------


def test_published_state_with_stickiness_and_query_cohorts_survives_the_store() -> None:
    for sticky in (BY_HEADER, BY_COOKIE):
        saved = SavedPublished((("checkout_v1", 80), ("checkout_v2", 20)),
                               (("checkout_v1", V1), ("checkout_v2", V2)), ((BETA, "checkout_v2"),), sticky)
        assert decode_published(encode_published(saved)) == saved
    old = json.dumps({"route": [["checkout_v1", 100]], "clusters": [["checkout_v1", {"version": "v1",
                      "endpoints": ["127.0.0.1:9001"]}]],
                      "cohorts": [[{"name": "internal", "match": [{"headers": [["x-team", {"kind": "exact",
                                                                                            "value": "qa"}]],
                                                                   "cookies": []}]}, "checkout_v2"]]})
    decoded = decode_published(old)  # saved before query conditions existed
    assert decoded.stickiness is None and decoded.cohorts[0][0].match[0].query == ()


def test_an_edited_stickiness_is_published_without_a_status_change() -> None:
    director = TrafficDirector(SnapshotCache(), ProxyStatus())
    runner = RolloutRunner(director, clock=lambda: 1000.0)
    for text in (POLICY.replace("version: v2", "version: v1"), POLICY):
        rollout, errors = parse(text)
        assert not errors
        runner.apply_policies(PolicySet({"checkout": rollout}, {"checkout": "checkout.yaml"}))
    desired = director.desired("checkout")
    assert desired is not None and desired.stickiness == BY_HEADER
    edited, errors = parse(POLICY.replace("{header: X-User-Id}", "{cookie: {name: session, ttl: 24h}}"))
    assert not errors
    runner.apply_policies(PolicySet({"checkout": edited}, {"checkout": "checkout.yaml"}))
    desired = director.desired("checkout")
    assert desired is not None and desired.stickiness == BY_COOKIE
    state = director.published_state("checkout")
    assert state is not None and state.stickiness == BY_COOKIE


def test_status_json_and_watch_show_the_stickiness() -> None:
    v2 = spec("v2", "{cookie: {name: session, ttl: 24h}}")
    running = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, 20)
    message = rollout_message(running, v2, [], WallClock(0.0, 0.0))
    assert message.stickiness == "cookie session (ttl 86400s)"
    assert "canary v2 at 20%, sticky by cookie session (ttl 86400s)" in rollout_line(message)
    assert json.loads(as_json(message))["stickiness"] == "cookie session (ttl 86400s)"
    console = Console(width=240, record=True, file=io.StringIO())
    console.print(watch_view({"checkout": message}, []))
    assert "sticky by cookie session (ttl 86400s)" in console.export_text()

    stable = rollout_message(RolloutStatus("checkout", Phase.STABLE, V1), v2, [], WallClock(0.0, 0.0))
    assert stable.stickiness == "" and "sticky" not in rollout_line(stable)
    assert json.loads(as_json(stable))["stickiness"] == ""

    status, actions = step(v2, running, Abort("test"), 5.0)
    event = [a.event for a in actions if hasattr(a, "event")][-1]
    assert status.phase is Phase.ROLLED_BACK
    after = apply_event(message, event_message(event, WallClock(0.0, 0.0)))
    assert after.stickiness == "" and "sticky" not in rollout_line(after)
