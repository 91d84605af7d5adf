"""Mirroring (``{mirror: 100}`` steps) through a real Envoy, analysed by a real Prometheus.

One in-process control plane, one Envoy and one Prometheus (scraping Envoy's admin
``/stats/prometheus`` every second) serve the module; each test has its own rollout name, listener
port and backends (v1 and v2 answer with their version; the backend process counts the requests
each port received, which is how copies are counted: a copy's answer never reaches a user).

- In a mirror step the canary backend gets a copy of every request while every user answer comes
  from stable; Envoy counts the copies in the canary cluster's ``upstream_rq_xx`` (what the
  built-in templates query), so a check round passes on them.
- A canary that answers 500 to every copy is rolled back by analysis with no user-facing error,
  in one RDS update, and gets no copy once Envoy has the rollback.
- An Abort from the mirror step under load is one RDS update with no failed request.

Figures (copies received, user answers by version, failed requests, time from the first canary 5xx
to the rollback at Envoy) are printed and written to ``tests/e2e/.results/mirror.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest

from aviary.discovery.resources import cluster_name
from aviary.metrics.templates import request_count_query, template_query
from aviary.policy.analysis import CheckOutcome
from aviary.policy.rollout_state import Abort, Phase
from tests.conftest import LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.ports import free_port, port_open
from tests.rig.stage import HOST, Rig, Stage, fetch, running_rig, write_results
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

RESULTS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory.mktemp("mirror"), Rig) as rig:
        yield rig
        write_results("mirror", RESULTS)


@dataclass(frozen=True)
class AtEnvoy:
    """What Envoy routes for one rollout, read from its config dump, and when it was read."""

    at: float  # time.time()
    weights: dict[str, int]
    mirror: dict[str, int]
    canary_requests: int  # requests the canary backend has received so far (copies included)
    rds_updates: int


@dataclass
class Canary(Stage):
    """One rollout (``Stage``) and every distinct state of it seen at Envoy."""

    seen: list[AtEnvoy] = field(default_factory=list, kw_only=True)

    @property
    def canary_cluster(self) -> str:
        return cluster_name(self.name, "v2")

    def _rds_updates(self) -> int:
        wanted = quote(f"rds.{self.route}.update_success")
        stats = json.loads(self.envoy.admin_get(f"/stats?format=json&filter={wanted}"))
        return sum(int(s["value"]) for s in stats.get("stats", []) if isinstance(s.get("value"), int))

    def at_envoy(self) -> AtEnvoy:
        """Envoy's route and its RDS update count as of one moment: a push landing between reading
        the count and reading the route would pair an old count with a new route, so both are read
        again until the count is the same before and after the route."""
        envoy = self.envoy
        while True:
            updates = self._rds_updates()
            weights = envoy.route_weights(self.route).get(self.name, {})
            mirror = envoy.route_mirrors(self.route).get(self.name, {})
            if self._rds_updates() == updates:
                return AtEnvoy(time.time(), weights, mirror, self.backends.counts()["v2"], updates)

    @property
    def mirroring(self) -> dict[str, int]:
        return {self.canary_cluster: 100}

    @property
    def stable_only(self) -> dict[str, int]:
        return {cluster_name(self.name, "v1"): 100}

    def wait_at_envoy(self, predicate: Callable[[AtEnvoy], bool], what: str, timeout: float = 20) -> AtEnvoy:
        """Poll Envoy until ``predicate`` holds, keeping every distinct state seen (with its time)."""

        def check() -> AtEnvoy | None:
            now = self.at_envoy()
            last = self.seen[-1] if self.seen else None
            if last is None or (last.weights, last.mirror) != (now.weights, now.mirror):
                self.seen.append(now)
            return now if predicate(now) else None

        try:
            return wait_until(check, timeout, interval=0.02, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nseen at Envoy: {self.seen}\n{self.story()}") from exc


@pytest.fixture
def canary_factory(rig: Rig, backends: Backends) -> Iterator[Callable[[str], Canary]]:
    """``canary_factory(name)``: v1 serving through Envoy on a fresh port. Its file goes at teardown."""
    made: list[Canary] = []
    if not backends.ports:
        backends.start(["v1", "v2"])

    def make(name: str) -> Canary:
        canary = Canary(rig.plane, rig.envoy, backends, rig.policies, free_port(), name=name)
        canary.write("v1")
        canary.wait_at_envoy(lambda e: e.weights == canary.stable_only and port_open(canary.port),
                             f"Envoy to route to {name}_v1")
        made.append(canary)
        return canary

    try:
        yield make
    finally:
        for canary in made:
            (rig.policies / f"{canary.name}.yaml").unlink(missing_ok=True)


def analysis(rig: Rig, **overrides: Any) -> dict[str, Any]:
    """Fast checks: every 1 s over a 5 s window of the canary cluster, 5 requests suffice."""
    base: dict[str, Any] = {"prometheus": rig.prometheus.url, "checkEvery": "1s", "window": "5s",
                            "minRequests": 5, "failureLimit": 0, "inconclusiveLimit": 10}
    return {**base, **overrides, "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}]}


MIRROR_STEP = {"steps": [{"mirror": 100}, 5], "interval": "10m"}  # stays in the mirror step


def test_the_canary_gets_a_copy_of_every_request_and_users_get_stable(
        rig: Rig, canary_factory: Callable[[str], Canary]) -> None:
    canary = canary_factory("mirror-copies")
    # Rounds are inconclusive until requests come: allow plenty of them (this test judges nothing failing).
    canary.write("v2", MIRROR_STEP, analysis(rig, inconclusiveLimit=1000))
    canary.wait_at_envoy(lambda e: e.mirror == canary.mirroring and e.weights.get(canary.canary_cluster) == 0,
                         "Envoy to mirror 100 % to v2 at weight 0")
    wait_until(lambda: canary.status().step_started_at is not None, 10, what="the mirror step to start (ACKed)")
    assert (canary.status().mirror, canary.status().acked_mirror) == (100, 100)
    before = canary.backends.counts()
    users = fetch(canary.port, 300)
    after = wait_until(lambda: (c := canary.backends.counts())["v2"] >= before["v2"] + 300 and c, 10,
                       what="300 copies at the canary backend")
    copies, stable_hits = after["v2"] - before["v2"], after["v1"] - before["v1"]
    envoy_stats = rig.envoy.stats()
    shadow_completed = envoy_stats.get(f"cluster.{canary.canary_cluster}.upstream_rq_completed", 0)
    # The built-in templates' own queries, over the canary cluster, count the copies.
    count_query = request_count_query(canary.canary_cluster, 60)
    counted = wait_until(lambda: (v := rig.prometheus.query_value(count_query)) is not None and v >= 300 and v,
                         15, what="Prometheus to count 300 canary requests")
    success = rig.prometheus.query_value(template_query("request-success-rate", canary.canary_cluster, 60))
    passed = wait_until(lambda: canary.status().step_outcome is CheckOutcome.PASS and canary.status(), 15,
                        what="a passing check round in the mirror step")
    figures = {"user_answers": users, "copies_at_canary": copies, "requests_at_stable": stable_hits,
               "envoy_canary_upstream_rq_completed": shadow_completed, "prometheus_canary_requests": counted,
               "prometheus_canary_success_rate": success,
               "check_round": [str(check) for check in passed.last_checks]}
    print(f"[figures] mirror 100 %: {figures}")
    RESULTS["copies"] = figures
    assert users == {"failed": 0, "v1": 300}
    assert copies == 300 and stable_hits == 300
    assert shadow_completed == 300
    assert counted == pytest.approx(300, rel=0.05)
    assert success == 100
    assert passed.step_index == 0 and passed.mirror == 100  # the round passed on copies alone


def _watch_copies_stop(canary: Canary, load: Any) -> tuple[int, int, int]:
    """Once Envoy has the rollback: the canary backend's count then, after 100 and after 300 more
    user requests. The first gap is copies that were in flight; the second must be 0."""
    c0 = canary.backends.counts()["v2"]
    load.wait_for_requests(100, timeout=15)
    c1 = canary.backends.counts()["v2"]
    load.wait_for_requests(300, timeout=15)
    c2 = canary.backends.counts()["v2"]
    return c0, c1, c2


def test_a_failing_canary_in_a_mirror_step_is_rolled_back_with_no_user_error(
        rig: Rig, canary_factory: Callable[[str], Canary], loadgen_factory: LoadgenFactory) -> None:
    canary = canary_factory("mirror-fails")
    canary.backends.set_behaviour("v2", error_rate=1.0)  # every copy gets a 500; users never see one
    load = loadgen_factory(f"127.0.0.1:{canary.port}", HOST, 4, 40.0)
    load.wait_for_requests(40, timeout=15)
    canary.write("v2", MIRROR_STEP, analysis(rig))
    mirroring = canary.wait_at_envoy(lambda e: e.mirror == canary.mirroring, "Envoy to mirror to v2")
    first_5xx = canary.wait_at_envoy(lambda e: e.canary_requests > 0, "the first copy (a 500) at v2")
    rolled_back = canary.wait_at_envoy(lambda e: e.weights == canary.stable_only and not e.mirror,
                                       "the rollback at Envoy (no mirror, no v2)", timeout=30)
    c0, c1, c2 = _watch_copies_stop(canary, load)
    result = load.stop()
    status = canary.status()
    rollback_event = [e for e in canary.history() if e.to_phase is Phase.ROLLED_BACK]
    figures = {
        "first_canary_5xx_to_rollback_at_envoy_s": round(rolled_back.at - first_5xx.at, 3),
        "rds_pushes_for_rollback": rolled_back.rds_updates - mirroring.rds_updates,
        "copies_at_canary_until_rollback": c0, "copies_in_flight_at_rollback": c1 - c0,
        "copies_after_rollback": c2 - c1, "user_answers": result.by_version, "load_total": result.total,
        "load_failed": result.failed, "by_status": result.by_status,
        "rollback_reason": rollback_event[-1].reason if rollback_event else None,
        "rollback_checks": [str(check) for check in rollback_event[-1].checks] if rollback_event else [],
    }
    print(f"[figures] failing canary in a mirror step: {figures}")
    RESULTS["rollback_by_analysis"] = figures
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", canary.story()
    assert rollback_event and [(c.name, c.outcome) for c in rollback_event[-1].checks] == [
        ("success", CheckOutcome.FAIL)], canary.story()
    assert result.failed == 0, result.failures
    assert result.by_version == {"v1": result.total}
    assert c0 > 0 and c2 == c1, figures
    assert figures["rds_pushes_for_rollback"] == 1, (figures, canary.seen)
    assert figures["first_canary_5xx_to_rollback_at_envoy_s"] < 20, figures  # a hang bound, not a target


def test_abort_from_a_mirror_step_is_one_push_with_no_failed_request(
        rig: Rig, canary_factory: Callable[[str], Canary], loadgen_factory: LoadgenFactory) -> None:
    canary = canary_factory("mirror-abort")
    load = loadgen_factory(f"127.0.0.1:{canary.port}", HOST, 4, 40.0)
    load.wait_for_requests(40, timeout=15)
    canary.write("v2", MIRROR_STEP)
    canary.wait_at_envoy(lambda e: e.mirror == canary.mirroring and e.canary_requests >= 100, "100 copies at v2")
    wait_until(lambda: canary.status().step_started_at is not None, 10, what="the mirror step to start (ACKed)")
    before = canary.at_envoy()
    aborted_at = time.time()
    status = canary.command(Abort())
    assert status.phase is Phase.ROLLED_BACK and (status.mirror, status.cohorts) == (0, ())
    after = canary.wait_at_envoy(lambda e: e.weights == canary.stable_only and not e.mirror,
                                 "the abort at Envoy (no mirror, no v2)")
    c0, c1, c2 = _watch_copies_stop(canary, load)
    result = load.stop()
    figures = {"abort_to_envoy_s": round(after.at - aborted_at, 3),
               "rds_pushes": after.rds_updates - before.rds_updates,
               "copies_before_abort": before.canary_requests, "copies_in_flight_at_abort": c1 - c0,
               "copies_after_abort": c2 - c1, "load_total": result.total, "load_failed": result.failed,
               "user_answers": result.by_version}
    print(f"[figures] abort from a mirror step: {figures}")
    RESULTS["abort"] = figures
    assert figures["rds_pushes"] == 1, (figures, canary.seen)
    assert result.failed == 0, result.failures
    assert result.by_version == {"v1": result.total}
    assert c2 == c1, figures
