"""Cohorts by header and cookie through a real Envoy (issue 10, first slice).

One in-process control plane, one Envoy, backends v1 and v2 that answer with their version. The
policy opens two cohorts in its first step, then pauses (weight 0), then goes to 20 % and pauses:

- ``internal``: header ``x-team: qa`` OR cookie ``beta=1`` (two entries: two routes);
- ``eu-mobile``: header ``x-country`` matching ``DE|FR|NL`` AND ``user-agent`` containing ``Mobile``;
- ``probe-anonymous``: header ``x-probe`` present AND no cookie ``session`` (no cookie header at all,
  or one without that cookie).

At weight 0 and at 20 %, requests of each kind are counted by the version that answered: cohort
requests must all reach v2; plain requests, a neighbouring cookie (``beta=10``, ``xbeta=1``) and
half of the AND (only the country, only the user agent) follow the weight. A rollback from the
cohort step under load (a load generator plus a thread of cohort requests) must reach Envoy in one
RDS update with no failed request. Figures are printed and written to
``tests/e2e/.results/cohorts.json``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aviary.policy.rollout_state import Phase
from tests.conftest import ControlPlaneFactory, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.ports import free_port
from tests.rig.stage import HOST, fetch, in_background, start_plane_and_envoy, write_results
from tests.rig.stage import Stage as RolloutStage
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NAME = "shop"
STRATEGY: dict[str, Any] = {
    "cohorts": [
        {"name": "internal", "match": [{"headers": {"x-team": {"exact": "qa"}}},
                                       {"cookies": {"beta": {"exact": "1"}}}]},
        {"name": "eu-mobile", "match": [{"headers": {"x-country": {"regex": "DE|FR|NL"},
                                                     "user-agent": {"contains": "Mobile"}}}]},
        {"name": "probe-anonymous", "match": [{"headers": {"x-probe": {"present": True}},
                                               "cookies": {"session": {"absent": True}}}]},
    ],
    "steps": [{"cohorts": ["internal", "eu-mobile", "probe-anonymous"]}, {"pause": {}}, 20, {"pause": {}}],
    "interval": "1s",
}
# Request kinds: headers, and whether they belong to an opened cohort.
KINDS: dict[str, tuple[dict[str, str], bool]] = {
    "plain": ({}, False),
    "header x-team=qa": ({"x-team": "qa"}, True),
    "cookie beta=1": ({"cookie": "a=b; beta=1; c=d"}, True),
    "cookie beta=1 first": ({"cookie": "beta=1"}, True),
    "AND country+mobile": ({"x-country": "FR", "user-agent": "Foo Mobile/1"}, True),
    "cookie beta=10": ({"cookie": "beta=10"}, False),
    "cookie xbeta=1": ({"cookie": "xbeta=1; other=beta"}, False),
    "only x-country=DE": ({"x-country": "DE"}, False),
    "only Mobile": ({"user-agent": "Mobile"}, False),
    "header x-team=qa2": ({"x-team": "qa2"}, False),
    "probe, no cookie header": ({"x-probe": "1"}, True),
    "probe, other cookies": ({"x-probe": "1", "cookie": "a=1; sessions=2"}, True),
    "probe, session cookie": ({"x-probe": "1", "cookie": "a=1; session=abc"}, False),
}
RESULTS: dict[str, Any] = {}


class Stage(RolloutStage):
    """The rollout ``shop`` (``tests/rig/stage.Stage``) and its cohort routes at Envoy."""

    def cohort_routes(self) -> int:
        return len(self.envoy.cohort_routes(self.route).get(NAME, []))

    def wait_paused_at(self, step_index: int, weights: dict[str, int], cohort_routes: int) -> None:
        def there() -> bool:
            status = self.status()
            return (status.phase is Phase.PAUSED and status.step_index == step_index
                    and self.weights() == weights and self.cohort_routes() == cohort_routes)

        wait_until(there, 20, what=f"{NAME} paused at step {step_index + 1}, Envoy at {weights}")


@pytest.fixture
def stage(control_plane_factory: ControlPlaneFactory, envoy_factory: EnvoyFactory, backends: Backends,
          workdir: Path) -> Iterator[Stage]:
    plane, envoy, policies = start_plane_and_envoy(workdir, backends, control_plane_factory, envoy_factory)
    stage = Stage(plane, envoy, backends, policies, free_port(), name=NAME)
    stage.serve_v1()
    yield stage
    RESULTS.update(stage.figures)
    write_results("cohorts", RESULTS)


def shares(stage: Stage, n_plain: int, n_kind: int) -> dict[str, dict[str, int]]:
    return {kind: fetch(stage.port, n_plain if kind == "plain" else n_kind, headers)
            for kind, (headers, _) in KINDS.items()}


def test_cohort_requests_reach_the_canary_at_weight_0_and_20(stage: Stage) -> None:
    stage.write("v2", STRATEGY)
    stage.wait_paused_at(1, {f"{NAME}_v1": 100, f"{NAME}_v2": 0}, cohort_routes=4)
    assert stage.status().cohorts == ("internal", "eu-mobile", "probe-anonymous")
    at_0 = shares(stage, 300, 40)
    print(f"[figures] weight 0: {at_0}")
    for kind, (_, in_cohort) in KINDS.items():
        counts = at_0[kind]
        assert counts["failed"] == 0, (kind, counts)
        assert counts.get("v2" if in_cohort else "v1", 0) == sum(counts.values()), (kind, counts)

    stage.resume()
    stage.wait_paused_at(3, {f"{NAME}_v1": 80, f"{NAME}_v2": 20}, cohort_routes=4)
    assert stage.status().cohorts == ("internal", "eu-mobile", "probe-anonymous")
    at_20 = shares(stage, 1000, 100)
    print(f"[figures] weight 20: {at_20}")
    for kind, (_, in_cohort) in KINDS.items():
        counts = at_20[kind]
        assert counts["failed"] == 0, (kind, counts)
        total = sum(counts.values())
        if in_cohort:
            assert counts.get("v2", 0) == total, (kind, counts)
        elif kind == "plain":  # 1,000 requests at 20 %: sd 1.3 points, bounds ±5 points
            assert 0.15 <= counts.get("v2", 0) / total <= 0.25, counts
        else:  # 100 requests at 20 %: neither all nor none on the canary (P < 1e-9 each)
            assert 0 < counts.get("v2", 0) < total, (kind, counts)
    stage.figures["shares"] = {"weight_0": at_0, "weight_20": at_20}


@pytest.mark.parametrize("weight", [0, 20])
def test_rollback_from_a_cohort_step_is_one_push_with_no_failed_request(
        stage: Stage, loadgen_factory: LoadgenFactory, weight: int) -> None:
    stage.write("v2", STRATEGY)
    stage.wait_paused_at(1, {f"{NAME}_v1": 100, f"{NAME}_v2": 0}, cohort_routes=4)
    if weight:
        stage.resume()
        stage.wait_paused_at(3, {f"{NAME}_v1": 100 - weight, f"{NAME}_v2": weight}, cohort_routes=4)
    load = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, 4, 40.0)
    load.wait_for_requests(100, timeout=15)
    cohort_counts: dict[str, int] = {"failed": 0}

    def cohort_load(stop: threading.Event) -> None:
        while not stop.is_set():
            for key, n in fetch(stage.port, 20, {"x-team": "qa"}).items():
                cohort_counts[key] = cohort_counts.get(key, 0) + n

    with in_background(cohort_load, "cohort-load"):
        wait_until(lambda: cohort_counts.get("v2", 0) >= 100, 15, what="cohort requests on v2")
        updates_before = stage.rds_updates()
        status, at_envoy_s = stage.abort(
            lambda: stage.weights() == {f"{NAME}_v1": 100} and stage.cohort_routes() == 0)
        assert status.cohorts == (), status
        v1_before = cohort_counts.get("v1", 0)
        wait_until(lambda: cohort_counts.get("v1", 0) >= v1_before + 50, 15, what="cohort requests back on v1")
        load.wait_for_requests(100, timeout=15)
        rds_pushes = stage.rds_updates() - updates_before
    result = load.stop()
    figures = {"rollback_to_envoy_s": round(at_envoy_s, 3), "rds_pushes": rds_pushes,
               "load_total": result.total, "load_failed": result.failed,
               "cohort_requests": dict(cohort_counts)}
    print(f"[figures] rollback from cohorts at weight {weight}: {figures}")
    stage.figures[f"rollback_from_cohorts_at_weight_{weight}"] = figures
    assert rds_pushes == 1, figures
    assert result.failed == 0, result.failures
    assert cohort_counts["failed"] == 0, cohort_counts
    assert at_envoy_s < 2.0, figures
