"""End-to-end canary rollouts: real Envoy, real Prometheus, backends whose behaviour tests change.

One Envoy, one Prometheus (scraping Envoy's admin ``/stats/prometheus`` every second) and one
in-process control plane serve the whole module. Two more Envoys follow the same control plane: one
on incremental ADS (DELTA_GRPC) and one on the per-type discovery services (no ADS). They carry no
load, but every step waits for their ACKs too, and the promotion and rollback tests check that
their routes end where the first Envoy's does: the engine's decisions reach Envoys of all three
modes. each test has its own rollout name, listener port
and backends, so the tests never see each other's clusters or metrics. A test writes the policy
with v1 (stable), waits until Envoy routes to it, starts steady load, then rewrites the file with
v2 + strategy + analysis.

Timings (time to promote, time from the first 5xx to a canary weight of 0 in Envoy) are printed
and written to ``tests/e2e/.results/rollouts.json``; only generous upper bounds are asserted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from aviary.discovery.resources import route_name
from aviary.policy.analysis import CheckOutcome
from aviary.policy.rollout_state import Hold, Phase, RolloutStatus, TransitionEvent
from aviary.policy.schema import ListenerSpec
from tests.conftest import LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import write_policy
from tests.rig.envoy import EnvoyProcess
from tests.rig.json_server import JsonServer
from tests.rig.loadgen import LoadGenerator
from tests.rig.ports import free_port, port_open
from tests.rig.stage import HOST, RouteWatch, running_rig, write_results
from tests.rig.stage import Rig as BaseRig
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENTS = 4
RATE_PER_CLIENT = 40.0  # ~160 req/s in all: plenty of canary requests, little CPU on 2 cores


# ------------------------------------------------------------------------------------------ the rig


@dataclass
class Rig(BaseRig):
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    other_envoys: list[EnvoyProcess] = field(default_factory=list)  # DELTA_GRPC and per-type: no load

    def wait_for_other_envoys(self, route: str, weights: dict[str, int], timeout: float = 10) -> None:
        """Wait until the delta and per-type Envoys route ``route`` by exactly ``weights``."""

        def merged(envoy: EnvoyProcess) -> dict[str, int]:
            return {c: w for vhost in envoy.route_weights(route).values() for c, w in vhost.items() if w}

        wait_until(lambda: all(merged(e) == weights for e in self.other_envoys), timeout,
                   what=f"route {weights} in the delta and per-type Envoys")  # fmt: skip

    def status(self, name: str) -> RolloutStatus | None:
        return self.plane.call(lambda p: p.runner.status(name))

    def history(self, name: str) -> list[TransitionEvent]:
        return self.plane.call(lambda p: p.runner.history(name))

    def story(self, name: str) -> str:
        """The rollout's transitions, one per line, for assertion messages."""
        lines = []
        for event in self.history(name):
            checks = "; ".join(str(check) for check in event.checks)
            lines.append(f"  {event.at:.2f} {event}" + (f" [{checks}]" if checks else ""))
        return "\n".join(lines) or "  (no transitions)"

    def engine_now(self) -> float:
        """The rollout engine's clock, the time base of statuses and transition events."""
        return self.plane.call(lambda p: getattr(p.runner, "now", time.monotonic)())

    def record(self, test: str, **values: Any) -> None:
        self.timings.setdefault(test, {}).update(values)
        print(f"[timing] {test}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("rollouts")
    started_at = time.monotonic()
    with running_rig(base, Rig) as rig:
        try:
            for mode, delta, per_type in (("delta", True, False), ("per-type", False, True)):
                envoy = EnvoyProcess(base / f"envoy-{mode}", rig.plane.xds_port, node_id=f"envoy-{mode}",
                                     delta=delta, per_type=per_type)  # fmt: skip
                rig.other_envoys.append(envoy)
                envoy.start()
            rig.record("module", setup_s=time.monotonic() - started_at)
            yield rig
            rig.record("module", wall_s=time.monotonic() - started_at)
            write_results("rollouts", rig.timings)
        finally:
            for envoy in rig.other_envoys:
                with contextlib.suppress(Exception):
                    envoy.stop()


@pytest.fixture(autouse=True)
def _dump_module_processes_on_failure(rig: Rig, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    from tests.conftest import _FAILED  # the flag conftest's report hook sets on the test item

    if request.node.stash.get(_FAILED, False):
        for thing in (rig.envoy, *rig.other_envoys, rig.prometheus, rig.plane):
            print(f"\n===== {thing.describe()}")


# ------------------------------------------------------------------------------------------ helpers


def write_rollout(
    rig: Rig,
    name: str,
    port: int,
    version: str,
    endpoints: list[str],
    strategy: dict[str, Any] | None = None,
    analysis: dict[str, Any] | None = None,
) -> float:
    """Write ``<name>.yaml`` atomically; returns the engine's clock just before the write (the
    watcher sees the file only once it is renamed in place, after that)."""
    written_at = rig.engine_now()
    write_policy(rig.policies, name, port=port, version=version, endpoints=endpoints, strategy=strategy,
                 analysis=analysis)
    return written_at


def analysis(rig: Rig, metrics: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Fast checks for tests: every 1 s over a 5 s window, 5 canary requests suffice."""
    base: dict[str, Any] = {
        "prometheus": rig.prometheus.url,
        "checkEvery": "1s",
        "window": "5s",
        "minRequests": 5,
        "failureLimit": 0,
        "inconclusiveLimit": 10,
    }
    return {**base, **overrides, "metrics": metrics}


SUCCESS_RATE = {"name": "success", "template": "request-success-rate", "min": 99}


class WeightWatch(RouteWatch):
    """A ``RouteWatch`` (every 50 ms) that reads the canary's weight out of the changes.

    The canary's weight counts as 0 once it is gone from the route (a rollback drops it).
    """

    def __init__(self, envoy: EnvoyProcess, route: str, canary_cluster: str, interval: float = 0.05) -> None:
        super().__init__(envoy, route, interval)
        self.canary = canary_cluster

    def canary_weight(self) -> int:
        return self.changes[-1][1].get(self.canary, 0) if self.changes else 0

    def canary_weights(self) -> list[int]:
        """The canary weights Envoy showed, in order, repeats folded."""
        out: list[int] = []
        for _, weights in self.changes:
            weight = weights.get(self.canary, 0)
            if not out or out[-1] != weight:
                out.append(weight)
        return out

    def first_canary_traffic_at(self) -> float | None:
        return next((at for at, w in self.changes if w.get(self.canary, 0) > 0), None)

    def first_zero_after(self, since: float) -> float | None:
        """Epoch time of the first poll after ``since`` with canary weight 0, following some traffic."""
        seen_traffic = False
        for at, weights in self.changes:
            weight = weights.get(self.canary, 0)
            seen_traffic = seen_traffic or weight > 0
            if seen_traffic and weight == 0 and at >= since:
                return at
        return None


@dataclass
class Canary:
    """One rollout under test: its backends, its listener, its load and its weight watch."""

    rig: Rig
    name: str
    backends: Backends
    port: int
    watch: WeightWatch
    load: LoadGenerator | None = None
    written_at: float = 0.0  # the engine's clock at the v2 write

    def status(self) -> RolloutStatus:
        status = self.rig.status(self.name)
        assert status is not None, f"rollout {self.name} unknown to the control plane"
        return status

    def start(self, strategy: dict[str, Any], analysis: dict[str, Any]) -> None:
        self.written_at = write_rollout(
            self.rig, self.name, self.port, "v2", [self.backends.address("v2")], strategy, analysis
        )

    def wait_until_settled(self, timeout: float) -> RolloutStatus:
        """Wait until the canary is decided: stable again (promoted or not) or rolled back."""

        def decided() -> RolloutStatus | None:
            status = self.status()
            if status.phase is Phase.ROLLED_BACK or (status.phase is Phase.STABLE and status.stable.version == "v2"):
                return status
            return None

        try:
            return wait_until(decided, timeout, interval=0.05, what=f"rollout {self.name} to be decided")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.rig.story(self.name)}") from exc

    def wait_for_route(self, weights: dict[str, int], timeout: float = 10) -> None:
        """Wait until the weight watch has seen Envoy route exactly ``weights``."""
        watch = self.watch
        try:
            wait_until(lambda: watch.changes and watch.changes[-1][1] == weights, timeout, what=f"route {weights}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{watch.describe()}") from exc

    def transition_at(self, predicate: Callable[[TransitionEvent], bool]) -> float:
        """The engine's clock at the first transition matching ``predicate``."""
        for event in self.rig.history(self.name):
            if predicate(event):
                return event.at
        raise AssertionError(f"no such transition:\n{self.rig.story(self.name)}")


@contextlib.contextmanager
def canaries(rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory, *, clients: int = CLIENTS,
             rate: float = RATE_PER_CLIENT, warm_up: int = 40) -> Iterator[Callable[..., Canary]]:
    """``make(name, load=True, rate=rate)``: v1 serving through Envoy (and under load: ``clients``
    each sending ``rate`` requests a second, ``warm_up`` of them answered by v1 alone, none failing),
    v2 started. On the way out the policy files are removed, so the rollouts' listeners and
    clusters leave Envoy. The canary factories of the e2e modules are this, with their own load."""
    made: list[Canary] = []
    stack = contextlib.ExitStack()
    if not backends.ports:
        backends.start(["v1", "v2"])

    def make(name: str, load: bool = True, rate: float = rate) -> Canary:
        port = free_port()
        route = route_name(ListenerSpec(address="127.0.0.1", port=port))
        write_rollout(rig, name, port, "v1", [backends.address("v1")])
        wait_until(
            lambda: _merged(rig.envoy.route_weights(route)) == {f"{name}_v1": 100} and port_open(port),
            15,
            what=f"envoy to route 127.0.0.1:{port} to {name}_v1",
        )
        watch = stack.enter_context(WeightWatch(rig.envoy, route, f"{name}_v2"))
        canary = Canary(rig, name, backends, port, watch)
        if load:
            canary.load = loadgen_factory(f"127.0.0.1:{port}", HOST, clients, rate)
            before = canary.load.wait_for_requests(warm_up, timeout=15)
            assert before.failed == 0, before.failures
            assert before.by_version == {"v1": before.total}
        made.append(canary)
        return canary

    try:
        yield make
    finally:
        stack.close()
        for canary in made:
            if canary.load is not None:
                with contextlib.suppress(Exception):
                    canary.load.stop()
            (rig.policies / f"{canary.name}.yaml").unlink(missing_ok=True)


@pytest.fixture
def canary_factory(rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory) -> Iterator[Callable[..., Canary]]:
    """``canary_factory(name, load=True)``: ``canaries`` at about 160 requests a second."""
    with canaries(rig, backends, loadgen_factory) as make:
        yield make


def _merged(by_host: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for weights in by_host.values():
        out.update(weights)
    return out


def _next_requests(load: LoadGenerator, n: int = 100) -> dict[str, int]:
    """Counts of ``n`` requests (per version and failed), after letting requests in flight finish.

    The worker's progress file is refreshed every 0.1 s, so the first snapshot may predate the
    route change the caller just waited for; skipping 40 requests (~0.25 s) leaves that behind.
    """
    before = load.wait_for_requests(40, timeout=20)
    after = load.wait_for_requests(n, timeout=20)
    return {k: v for k, v in after.minus(before).items() if v}


# ------------------------------------------------------------------------------------------ tests


def test_healthy_canary_is_promoted_step_by_step_without_a_failed_request(
    rig: Rig, canary_factory: Callable[..., Canary]
) -> None:
    canary = canary_factory("healthy")
    canary.start(
        {"steps": [20, 50], "interval": "4s"},
        analysis(
            rig, [SUCCESS_RATE, {"name": "latency", "template": "request-duration-p99", "max": 500}], window="10s"
        ),
    )
    status = canary.wait_until_settled(60)
    story = rig.story(canary.name)
    assert status.phase is Phase.STABLE and status.stable.version == "v2", story
    promoted_at = canary.transition_at(lambda e: e.to_phase is Phase.STABLE and e.stable_version == "v2")
    progressing = [e.weight for e in rig.history(canary.name) if e.to_phase is Phase.PROGRESSING]
    assert sorted(set(progressing)) == [20, 50], story
    advanced = [e for e in rig.history(canary.name) if "passed" in e.reason]
    assert len(advanced) == 2, story  # each step ended on a passing round, with both checks passing
    assert all(c.outcome is CheckOutcome.PASS for e in advanced for c in e.checks), story

    # Envoy: 100 % to v2 and the v1 cluster gone once nothing routes to it.
    canary.wait_for_route({"healthy_v2": 100})
    wait_until(lambda: "healthy_v1" not in rig.envoy.cluster_names(), 10, what="cluster healthy_v1 to leave envoy")
    rig.wait_for_other_envoys(canary.watch.route, {"healthy_v2": 100})
    assert canary.load is not None
    assert set(_next_requests(canary.load)) == {"v2"}
    result = canary.load.stop()
    assert result.failed == 0, result.failures
    assert result.by_version.get("v2", 0) > 0
    assert canary.watch.canary_weights()[1:] == [20, 50, 100], canary.watch.describe()

    time_to_promote = promoted_at - canary.written_at
    rig.record("healthy_canary", time_to_promote_s=time_to_promote, requests=result.total, failed=result.failed)
    assert time_to_promote < 40, story


def test_canary_answering_500s_is_rolled_back_within_its_first_step(
    rig: Rig, canary_factory: Callable[..., Canary]
) -> None:
    canary = canary_factory("errors")
    canary.backends.set_behaviour("v2", error_rate=0.3)
    # A long interval, so "rolled back before leaving the first step" cannot be luck.
    canary.start({"steps": [20, 50], "interval": "20s"}, analysis(rig, [SUCCESS_RATE], window="5s"))
    status = canary.wait_until_settled(40)
    story = rig.story(canary.name)
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
    assert all(e.step_index == 0 for e in rig.history(canary.name) if e.to_phase is Phase.PROGRESSING), story
    failing = [c for c in status.last_checks if c.outcome is CheckOutcome.FAIL]
    assert [c.name for c in failing] == ["success"], story

    wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
    assert max(canary.watch.canary_weights()) == 20, canary.watch.describe()
    rig.wait_for_other_envoys(canary.watch.route, {"errors_v1": 100})
    assert canary.load is not None
    first_5xx = canary.load.snapshot().first_status_5xx_at
    assert first_5xx is not None
    zero_at = canary.watch.first_zero_after(first_5xx)
    assert zero_at is not None, canary.watch.describe()
    # Once rolled back, nothing reaches v2 and nothing fails.
    assert set(_next_requests(canary.load)) == {"v1"}

    rollback_s = zero_at - first_5xx
    rig.record(
        "error_canary",
        first_5xx_to_weight_0_s=rollback_s,
        goal_s=7.0,
        decided_after_write_s=canary.transition_at(lambda e: e.to_phase is Phase.ROLLED_BACK) - canary.written_at,
    )
    assert rollback_s < 30, f"{rollback_s:.1f}s\n{story}\n{canary.watch.describe()}"


def test_slow_canary_is_rolled_back_on_p99_latency(rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("slow")
    canary.backends.set_behaviour("v2", latency_ms=800)
    canary.start(
        {"steps": [20, 50], "interval": "30s"},
        # 10 s window: Envoy merges histograms on its stats flush (every 5 s by default), so the
        # p99 of a shorter window is often computed from two identical cumulative samples (NaN).
        analysis(rig, [{"name": "latency", "template": "request-duration-p99", "max": 500}], window="10s"),
    )
    status = canary.wait_until_settled(50)
    story = rig.story(canary.name)
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
    (latency,) = status.last_checks
    assert latency.outcome is CheckOutcome.FAIL and latency.value is not None and latency.value > 500, story

    wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
    traffic_at = canary.watch.first_canary_traffic_at()
    assert traffic_at is not None, canary.watch.describe()
    zero_at = canary.watch.first_zero_after(traffic_at)
    assert zero_at is not None, canary.watch.describe()
    assert canary.load is not None
    result = canary.load.stop()
    assert result.failed == 0, result.failures  # slow, not failing

    rollback_s = zero_at - traffic_at
    rig.record("slow_canary", first_canary_traffic_to_weight_0_s=rollback_s, p99_ms=latency.value)
    assert rollback_s < 40, f"{rollback_s:.1f}s\n{story}"


@pytest.mark.parametrize("on_inconclusive", ["rollback", "pause"])
def test_canary_without_traffic_never_advances(
    rig: Rig, canary_factory: Callable[..., Canary], on_inconclusive: str
) -> None:
    name = f"idle-{on_inconclusive}"
    canary = canary_factory(name, load=False)
    # The interval (2 s) ends long before the inconclusive limit is reached: only data may advance.
    canary.start(
        {"steps": [20, 50], "interval": "2s"},
        analysis(rig, [SUCCESS_RATE], inconclusiveLimit=4, onInconclusive=on_inconclusive),
    )

    def inconclusive_rounds(n: int) -> RolloutStatus | None:
        status = canary.status()
        return status if status.canary is not None and status.counters.inconclusive >= n else None

    # Past the interval, still on the first step, no pass counted.
    held = wait_until(lambda: inconclusive_rounds(3), 20, what=f"3 inconclusive rounds of {name}")
    story = rig.story(name)
    assert (held.phase, held.weight, held.step_index) == (Phase.PROGRESSING, 20, 0), story
    assert held.counters.passed == 0 and held.counters.failed == 0, story
    assert held.step_started_at is not None and rig.engine_now() - held.step_started_at > 2.0, story
    assert canary.watch.canary_weight() == 20, canary.watch.describe()
    reasons = {c.reason for c in held.last_checks}
    assert all("minRequests" in r for r in reasons), reasons

    status = wait_until(
        lambda: (s := canary.status()).phase in (Phase.ROLLED_BACK, Phase.PAUSED) and s,
        20,
        what=f"{name} to give up",
    )
    story = rig.story(name)
    if on_inconclusive == "rollback":
        assert status.counters.inconclusive == 5, story
        assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
        assert "inconclusive" in status.reason, story
        wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
    else:
        # Rounds go on while paused (the status stays informative), so the count may have moved on.
        assert status.phase is Phase.PAUSED and status.hold is Hold.INCONCLUSIVE, story
        assert status.counters.inconclusive >= 5 and "inconclusive (5) > inconclusiveLimit (4)" in status.reason, story
        assert status.weight == 20 and canary.watch.canary_weight() == 20, story
    assert max(canary.watch.canary_weights()) == 20, canary.watch.describe()
    rig.record(f"idle_canary_{on_inconclusive}", gave_up_after_write_s=status.updated_at - canary.written_at)


@pytest.mark.parametrize("passing", [True, False], ids=["promoted", "rolled-back"])
def test_custom_query_and_decrease_from_stable(rig: Rig, canary_factory: Callable[..., Canary], passing: bool) -> None:
    name = "custom-ok" if passing else "custom-bad"
    canary = canary_factory(name)
    if not passing:
        canary.backends.set_behaviour("v2", error_rate=0.2)
    metrics = [
        {
            "name": "canary-rps",
            "query": 'sum(rate(envoy_cluster_upstream_rq_completed{envoy_cluster_name="{{ canary }}"}[{{ window }}]))',
            "min": 1,
        },
        {"name": "vs-stable", "template": "request-success-rate", "maxDecreaseFromStable": 1},
    ]
    canary.start({"steps": [20, 50], "interval": "3s" if passing else "20s"}, analysis(rig, metrics))
    status = canary.wait_until_settled(40)
    story = rig.story(name)
    checks = {c.name: c for e in rig.history(name) for c in e.checks}
    assert canary.load is not None
    if passing:
        assert status.phase is Phase.STABLE and status.stable.version == "v2", story
        rps = checks["canary-rps"]
        assert rps.outcome is CheckOutcome.PASS and rps.value is not None and rps.value >= 1, story
        vs = checks["vs-stable"]
        assert vs.outcome is CheckOutcome.PASS and vs.stable_value is not None, story
        result = canary.load.stop()
        assert result.failed == 0, result.failures
        rig.record(
            "custom_query_promoted",
            time_to_promote_s=canary.transition_at(lambda e: e.to_phase is Phase.STABLE and e.stable_version == "v2")
            - canary.written_at,
        )
    else:
        assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
        outcomes = {c.name: c.outcome for c in status.last_checks}
        assert outcomes["vs-stable"] is CheckOutcome.FAIL, story
        wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
        first_5xx = canary.load.snapshot().first_status_5xx_at
        assert first_5xx is not None
        zero_at = canary.watch.first_zero_after(first_5xx)
        assert zero_at is not None, canary.watch.describe()
        rollback_s = zero_at - first_5xx
        rig.record("custom_query_rolled_back", first_5xx_to_weight_0_s=rollback_s, goal_s=7.0)
        assert rollback_s < 30, story


ERRORS_VS_STABLE = {"name": "errors-vs-stable", "template": "error-rate-5xx", "compare": {"by": "difference", "max": 5}}


@pytest.mark.parametrize("passing", [True, False])
def test_compare_check_against_stable(rig: Rig, canary_factory: Callable[..., Canary], passing: bool) -> None:
    """``compare`` on the 5xx rate: a canary as good as stable is promoted, one 30 points worse is
    rolled back in its first step; the result names both queries and both values."""
    name = "compare-ok" if passing else "compare-bad"
    canary = canary_factory(name)
    if not passing:
        canary.backends.set_behaviour("v2", error_rate=0.3)
    canary.start({"steps": [20, 50], "interval": "3s" if passing else "20s"}, analysis(rig, [ERRORS_VS_STABLE]))
    status = canary.wait_until_settled(40)
    story = rig.story(name)
    checks = [c for e in rig.history(name) for c in e.checks if c.name == "errors-vs-stable"]
    assert checks, story
    last = checks[-1]
    assert last.kind == "compare" and len(last.queries) == 2, story
    assert f'"{name}_v2"' in last.queries[0] and f'"{name}_v1"' in last.queries[1], story
    if passing:
        assert status.phase is Phase.STABLE and status.stable.version == "v2", story
        passed = [c for c in checks if c.outcome is CheckOutcome.PASS]
        assert passed and passed[-1].stable_value is not None, story
    else:
        assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
        assert all(e.step_index == 0 for e in rig.history(name) if e.to_phase is Phase.PROGRESSING), story
        assert last.outcome is CheckOutcome.FAIL and last.reason.endswith("> max (5)"), story
        wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")


def test_web_metric_rolls_back_a_canary_whose_orders_fall(rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    """The ``web`` provider drives a rollback: the shop's own JSON says the canary converts 60 %
    fewer requests into orders than stable, and Envoy's route goes back to v1 in the first step."""
    with JsonServer() as shop:
        shop.json("/orders/v1", {"orders": {"perRequest": 0.3}})
        shop.json("/orders/v2", {"orders": {"perRequest": 0.12}})
        canary = canary_factory("web-orders")
        orders = {"name": "orders", "web": {"url": shop.url + "/orders/{{ canary_version }}",
                                            "jsonPath": "$.orders.perRequest"},
                  "compare": {"by": "ratio", "min": 0.9}}
        canary.start({"steps": [20, 50], "interval": "20s"}, analysis(rig, [SUCCESS_RATE, orders]))
        status = canary.wait_until_settled(40)
        story = rig.story(canary.name)
        assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
        assert all(e.step_index == 0 for e in rig.history(canary.name) if e.to_phase is Phase.PROGRESSING), story
        failing = {c.name: c for c in status.last_checks if c.outcome is CheckOutcome.FAIL}
        assert list(failing) == ["orders"], story
        assert failing["orders"].reason == "canary 0.12 / stable 0.3 = 0.4 < min (0.9)", story
        assert failing["orders"].queries == (f"{shop.url}/orders/v2#$.orders.perRequest",
                                             f"{shop.url}/orders/v1#$.orders.perRequest"), story
        assert {"/orders/v1", "/orders/v2"} <= set(shop.asked)
    wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
    assert max(canary.watch.canary_weights()) == 20, canary.watch.describe()
    assert canary.load is not None
    assert set(_next_requests(canary.load)) == {"v1"}


def test_prometheus_outage_holds_the_step_then_the_rollout_carries_on(
    rig: Rig, canary_factory: Callable[..., Canary]
) -> None:
    canary = canary_factory("outage")
    canary.start({"steps": [20, 50], "interval": "3s"}, analysis(rig, [SUCCESS_RATE], inconclusiveLimit=100))
    wait_until(lambda: canary.status().step_started_at is not None, 10, what="first step to start")
    prometheus = rig.prometheus
    try:
        prometheus.stop()
        down_at = rig.engine_now()
        # Rounds keep coming and stay inconclusive, well past the 3 s interval.
        held = wait_until(
            lambda: (s := canary.status()).counters.inconclusive >= 6 and s, 20, what="6 rounds without Prometheus"
        )
        story = rig.story(canary.name)
        assert (held.phase, held.step_index, held.weight) == (Phase.PROGRESSING, 0, 20), story
        assert all(c.outcome is CheckOutcome.INCONCLUSIVE and prometheus.url in c.reason for c in held.last_checks), (
            story
        )
        assert max(canary.watch.canary_weights()) == 20, canary.watch.describe()
    finally:
        prometheus.start()
        up_at = rig.engine_now()
    status = canary.wait_until_settled(60)
    story = rig.story(canary.name)
    assert status.phase is Phase.STABLE and status.stable.version == "v2", story
    canary.wait_for_route({"outage_v2": 100})
    assert canary.watch.canary_weights()[1:] == [20, 50, 100], canary.watch.describe()
    promoted_at = canary.transition_at(lambda e: e.to_phase is Phase.STABLE and e.stable_version == "v2")
    assert canary.load is not None
    result = canary.load.stop()
    assert result.failed == 0, result.failures
    rig.record(
        "prometheus_outage",
        outage_s=up_at - down_at,
        restart_to_promote_s=promoted_at - up_at,
        time_to_promote_s=promoted_at - canary.written_at,
    )
    # Later tests (if any) find Prometheus scraping again.
    prometheus.wait_for_target_up(timeout=30)
