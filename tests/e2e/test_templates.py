"""Built-in templates catch what a success rate does not, through a real Envoy and a real Prometheus.

One Envoy, one Prometheus and one in-process control plane serve the module, with one backends
process whose version ports Prometheus scrapes too (``GET /metrics``: ``orders_completed_total``
labelled ``version``, see ``deploy/demo/backend.py``). Each test has its own rollout name, listener
and versions (so neither Envoy's cluster stats nor the backends' version series are shared). A test
serves the stable version under steady load, then writes the canary with strategy and analysis:

- a canary answering 404 to a third of its requests: ``error-rate-4xx`` compared with stable rolls
  it back in its first step, while ``error-rate-5xx`` in the same policy passes (no 5xx at all);
- a canary converting fewer requests into orders: ``version-rate-per-request`` with
  ``metric: orders_completed_total`` and ``analysis.versionLabel: version``, compared with stable
  by ratio, rolls it back; the same policy promotes a canary that converts as well as stable.

Figures (seconds from the canary's write to the decision and to weight 0 at Envoy, the values the
checks saw) are printed and written to ``tests/e2e/.results/templates.json``; only generous hang
bounds are asserted on time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from aviary.discovery.resources import route_name
from aviary.policy.analysis import CheckOutcome, CheckResult
from aviary.policy.rollout_state import Phase, RolloutStatus
from aviary.policy.schema import ListenerSpec
from tests.conftest import LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import write_policy
from tests.rig.loadgen import LoadGenerator
from tests.rig.ports import free_port, port_open
from tests.rig.stage import HOST, Rig, RouteWatch, Stage, running_rig, write_results
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENTS = 4
RATE_PER_CLIENT = 40.0  # ~160 req/s: ~30 req/s reach a 20 % canary, little CPU on 2 cores
# (stable, canary) per test: distinct versions, so each test has its own version-labelled series.
VERSIONS = {"clients": ("v1", "v2"), "orders-ok": ("v3", "v4"), "orders-bad": ("v5", "v6")}
RESULTS: dict[str, Any] = {}


@dataclass
class TemplatesRig(Rig):
    backends: Backends | None = None


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemplatesRig]:
    base = tmp_path_factory.mktemp("templates")
    with Backends(base / "backends") as backends:
        backends.start([v for pair in VERSIONS.values() for v in pair])
        targets = [backends.address(v) for v in backends.ports]  # their /metrics, job "app"
        with running_rig(base, TemplatesRig, app_targets=targets) as rig:
            rig.backends = backends
            yield rig
            write_results("templates", RESULTS)


@dataclass(kw_only=True)
class Scene(Stage):
    """One rollout (``Stage``) from ``stable`` to ``canary``, under load, its route watched."""

    stable: str
    canary: str
    load: LoadGenerator
    watch: RouteWatch

    def start_canary(self, strategy: dict[str, Any], analysis: dict[str, Any]) -> tuple[float, float]:
        """Write the canary; (engine clock, wall clock) just before the write."""
        at = self.plane.call(lambda p: p.runner.now()), time.time()
        self.write(self.canary, strategy, analysis)
        return at

    def wait_decided(self, timeout: float) -> RolloutStatus:
        def decided() -> RolloutStatus | None:
            status = self.status()
            if status.phase is Phase.ROLLED_BACK or (
                    status.phase is Phase.STABLE and status.stable.version == self.canary):
                return status
            return None

        try:
            status = wait_until(decided, timeout, interval=0.05, what=f"{self.name} to be decided")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.story()}") from exc
        assert status is not None  # wait_until returns only a truthy value
        return status

    def decided_at(self) -> float:
        """The engine's clock at the decision (rolled back, or promoted)."""
        return next(e.at for e in self.history() if e.to_phase is Phase.ROLLED_BACK
                    or (e.to_phase is Phase.STABLE and e.stable_version == self.canary))

    def story(self) -> str:
        lines = []
        for event in self.history():
            checks = "; ".join(str(check) for check in event.checks)
            lines.append(f"  {event.at:.2f} {event}" + (f" [{checks}]" if checks else ""))
        return "\n".join(lines) or "  (no transitions)"


@pytest.fixture
def scene(rig: TemplatesRig, loadgen_factory: LoadgenFactory) -> Iterator[Callable[[str], Scene]]:
    """``scene(name)``: the stable version of ``VERSIONS[name]`` serving through Envoy under load."""
    made: list[Scene] = []
    stack = contextlib.ExitStack()
    backends = rig.backends
    assert backends is not None

    def make(name: str) -> Scene:
        stable, canary = VERSIONS[name]
        port = free_port()
        route = route_name(ListenerSpec(address="127.0.0.1", port=port))
        write_policy(rig.policies, name, port=port, version=stable, endpoints=[backends.address(stable)])
        wait_until(lambda: rig.envoy.route_weights(route).get(name) == {f"{name}_{stable}": 100} and port_open(port),
                   15, what=f"Envoy to route {name} to {stable}")
        watch = stack.enter_context(RouteWatch(rig.envoy, route, 0.05))
        load = loadgen_factory(f"127.0.0.1:{port}", HOST, CLIENTS, RATE_PER_CLIENT)
        first = load.wait_for_requests(40, timeout=15)
        assert first.failed == 0 and first.by_version == {stable: first.total}, first
        s = Scene(rig.plane, rig.envoy, backends, rig.policies, port, name=name, stable=stable, canary=canary,
                  load=load, watch=watch)
        made.append(s)
        return s

    try:
        yield make
    finally:
        stack.close()
        for s in made:
            RESULTS.setdefault(s.name, {}).update(s.figures)
            with contextlib.suppress(Exception):
                s.load.stop()
            (rig.policies / f"{s.name}.yaml").unlink(missing_ok=True)


def analysis(rig: Rig, metrics: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Fast checks: every second, 5 canary requests suffice, the first failing round rolls back."""
    return {"prometheus": rig.prometheus.url, "checkEvery": "1s", "window": "5s", "minRequests": 5,
            "failureLimit": 0, "inconclusiveLimit": 10, **overrides, "metrics": metrics}


def checks_of(status: RolloutStatus) -> dict[str, CheckResult]:
    return {c.name: c for c in status.last_checks}


def zero_at_envoy(s: Scene, since: float) -> float:
    """Wall clock of the first poll after ``since`` where Envoy routes everything to stable."""
    wait_until(lambda: s.weights() == {s.cluster(s.stable): 100}, 10, what=f"Envoy to route {s.name} back")
    wait_until(lambda: s.watch.first_after(since, {s.cluster(s.stable): 100}) is not None, 5,
               what="the route watch to see it")
    at = s.watch.first_after(since, {s.cluster(s.stable): 100})
    assert at is not None
    return at


def record(s: Scene, **figures: Any) -> None:
    s.figures.update(figures)
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"[templates] {s.name}: {shown}")


# ------------------------------------------------------------------------------------------ tests


FIVE_XX = {"name": "5xx-vs-stable", "template": "error-rate-5xx", "compare": {"by": "difference", "max": 5}}
FOUR_XX = {"name": "4xx-vs-stable", "template": "error-rate-4xx", "compare": {"by": "difference", "max": 5}}


def test_a_canary_answering_404s_is_rolled_back_on_4xx_where_5xx_sees_nothing(
        rig: TemplatesRig, scene: Callable[[str], Scene]) -> None:
    s = scene("clients")
    s.backends.set_behaviour(s.canary, client_error_rate=0.3)
    # A long interval: "rolled back in its first step" cannot be the step ending.
    written, written_wall = s.start_canary({"steps": [20, 50], "interval": "20s"}, analysis(rig, [FIVE_XX, FOUR_XX]))
    status = s.wait_decided(40)
    story = s.story()
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == s.canary, story
    assert all(e.step_index == 0 for e in s.history() if e.to_phase is Phase.PROGRESSING), story
    checks = checks_of(status)
    four, five = checks["4xx-vs-stable"], checks["5xx-vs-stable"]
    assert four.outcome is CheckOutcome.FAIL and four.reason.endswith("> max (5)"), story
    assert four.value is not None and four.value > 5 and four.stable_value == 0, story
    # The 5xx rate, judged on the same rounds, let the canary through: only the 4xx template saw it.
    assert five.outcome is CheckOutcome.PASS and five.value == 0, story
    assert f'"{s.cluster(s.canary)}"' in four.queries[0] and 'envoy_response_code_class="4"' in four.queries[0]

    zero = zero_at_envoy(s, written_wall)
    result = s.load.stop()
    assert result.failed > 0 and set(result.by_status) - {"200"} == {"404"}, result.by_status  # 404s, no 5xx
    assert result.first_status_5xx_at is None
    record(s, decided_after_write_s=s.decided_at() - written, weight_0_at_envoy_after_write_s=zero - written_wall,
           canary_4xx_pct=round(four.value, 1), stable_4xx_pct=four.stable_value, canary_5xx_pct=five.value,
           requests=result.total, answered_404=result.by_status["404"])
    assert zero - written_wall < 40, story


ORDERS = {"name": "orders-per-request", "template": "version-rate-per-request", "metric": "orders_completed_total",
          "compare": {"by": "ratio", "min": 0.7}}


@pytest.mark.parametrize("converts", [True, False], ids=["promoted", "rolled-back"])
def test_orders_per_request_by_version_label_decide_the_canary(
        rig: TemplatesRig, scene: Callable[[str], Scene], converts: bool) -> None:
    """The business metric of the backends themselves, selected by ``versionLabel``: a canary
    completing 0.05 orders per request against stable's 0.25 is rolled back; at 0.25 it is promoted.

    The ratio divides a backend's counter by Envoy's, scraped at different instants: a round on a
    second or two of canary traffic can read 0.6 for a healthy canary (0.87 is common). Hence what
    a real policy would say too: 50 canary requests before judging, one failed round forgiven and a
    minimum of 0.7.
    """
    s = scene("orders-ok" if converts else "orders-bad")
    s.backends.set_behaviour(s.stable, orders_per_request=0.25)
    s.backends.set_behaviour(s.canary, orders_per_request=0.25 if converts else 0.05)
    policy = analysis(rig, [ORDERS], versionLabel="version", window="10s", minRequests=50, failureLimit=1)
    strategy = {"steps": [20, 50], "interval": "4s" if converts else "20s"}
    written, written_wall = s.start_canary(strategy, policy)
    status = s.wait_decided(45)
    story = s.story()
    judged = [c for e in s.history() for c in e.checks if c.name == "orders-per-request"]
    assert judged, story
    last = judged[-1]
    assert last.kind == "compare" and len(last.queries) == 2, story
    assert f'orders_completed_total{{version="{s.canary}"}}' in last.queries[0], story
    assert f'orders_completed_total{{version="{s.stable}"}}' in last.queries[1], story
    ratios = [round(c.value / c.stable_value, 2) for c in judged
              if c.value is not None and c.stable_value]  # what each round saw
    s.figures["canary_over_stable"] = ratios
    if converts:
        assert status.phase is Phase.STABLE and status.stable.version == s.canary, story
        wait_until(lambda: s.weights() == {s.cluster(s.canary): 100}, 10, what="Envoy to route to the canary")
        result = s.load.stop()
        assert result.failed == 0, result.failures
        record(s, promoted_after_write_s=s.decided_at() - written, canary_over_stable=ratios,
               requests=result.total)
    else:
        assert status.phase is Phase.ROLLED_BACK and status.failed_version == s.canary, story
        assert all(e.step_index == 0 for e in s.history() if e.to_phase is Phase.PROGRESSING), story
        assert last.outcome is CheckOutcome.FAIL and last.reason.endswith("< min (0.7)"), story
        assert status.counters.failed == 2, story
        zero = zero_at_envoy(s, written_wall)
        result = s.load.stop()
        assert result.failed == 0, result.failures  # every request answered: only the business metric fell
        record(s, decided_after_write_s=s.decided_at() - written, weight_0_at_envoy_after_write_s=zero - written_wall,
               canary_over_stable=ratios, last_reason=last.reason, requests=result.total)
        assert zero - written_wall < 40, story
