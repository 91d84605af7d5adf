"""``analysis.judge`` through real Envoy and real Prometheus, at low load (a few requests per second).

The case the judge exists for: a canary 30 % slower than stable (52 ms against 40 ms per request).
A fixed p99 threshold set where both versions pass it (max 150 ms) cannot see that; the judge,
comparing canary and stable samples (one p99 per 2 s step since the canary started), rolls it
back. An identical canary is promoted by the same policy once every judged metric has its
minimum samples.

Figures (time from the canary's first traffic to its weight 0 in Envoy, samples judged) are
printed and written to ``tests/e2e/.results/judge.json``; only generous upper bounds are asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rich.console import Console

from aviary.admin import convert, render
from aviary.policy.analysis import CheckOutcome
from aviary.policy.rollout_state import Phase
from tests.conftest import LoadgenFactory
from tests.e2e.test_rollouts import Canary, Rig, canaries
from tests.rig.backends import Backends
from tests.rig.stage import running_rig, write_results
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENTS = 3
RATE_PER_CLIENT = 2.0  # ~6 req/s in all, ~3 req/s to a canary at 50 %
STABLE_MS = 40.0
SLOWER_MS = 52.0  # 30 % slower


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("judge")
    with running_rig(base, Rig) as rig:
        yield rig
        write_results("judge", rig.timings)


@pytest.fixture
def canary_factory(rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory) -> Iterator[Callable[..., Canary]]:
    """``canary_factory(name)``: v1 serving through Envoy under low load, v2 started (``canaries``)."""
    with canaries(rig, backends, loadgen_factory, clients=CLIENTS, rate=RATE_PER_CLIENT, warm_up=5) as make:
        yield make


def policy(rig: Rig) -> tuple[dict[str, Any], dict[str, Any]]:
    """One 50 % step of 10 s; a p99 threshold both versions pass, and the judge (2 s steps, 10
    samples a side)."""
    strategy = {"steps": [50], "interval": "10s"}
    analysis = {
        "prometheus": rig.prometheus.url, "checkEvery": "2s", "window": "10s", "minRequests": 5,
        "failureLimit": 0, "inconclusiveLimit": 10,
        "metrics": [{"name": "p99-threshold", "template": "request-duration-p99", "max": 150}],
        "judge": {
            "metrics": [
                {"name": "latency", "template": "request-duration-p99", "direction": "increase", "critical": True},
                {"name": "errors", "template": "error-rate-5xx", "direction": "increase"},
            ],
            "minSamples": 10, "step": "2s",
        },
    }
    return strategy, analysis


def test_judge_rolls_back_a_canary_30_percent_slower_that_a_p99_threshold_passes(
        rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("judge-slow")
    canary.backends.set_behaviour("v1", latency_ms=STABLE_MS)
    canary.backends.set_behaviour("v2", latency_ms=SLOWER_MS)
    started = time.monotonic()
    canary.start(*policy(rig))
    status = canary.wait_until_settled(55)
    story = rig.story(canary.name)
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
    checks = {check.name: check for check in status.last_checks}
    threshold, latency, verdict = checks["p99-threshold"], checks["latency"], checks["judge"]
    # The fixed threshold passes the slower canary; the judge does not.
    assert threshold.outcome is CheckOutcome.PASS, story
    assert threshold.value is not None and threshold.value <= 150, story
    assert (latency.outcome, latency.rule) == (CheckOutcome.FAIL, "beyond-allowed"), story
    assert latency.effect is not None and latency.effect > 0, story
    assert verdict.outcome is CheckOutcome.FAIL and "critical metric failed: latency" in verdict.reason, story

    wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
    traffic_at = canary.watch.first_canary_traffic_at()
    zero_at = canary.watch.first_zero_after(traffic_at) if traffic_at is not None else None
    assert traffic_at is not None and zero_at is not None, canary.watch.describe()
    assert canary.load is not None
    result = canary.load.stop()
    assert result.failed == 0, result.failures
    rig.record("slower_canary", first_canary_traffic_to_weight_0_s=zero_at - traffic_at,
               canary_samples=latency.canary_samples, stable_samples=latency.stable_samples,
               effect_ms=latency.effect, interval_ms=list(latency.effect_interval or ()),
               threshold_p99_ms=threshold.value, requests=result.total, test_s=time.monotonic() - started)
    assert zero_at - traffic_at < 50, story

    # What `aviary explain` shows: the rounds, samples growing until the judge could decide.
    rounds = rig.plane.call(lambda p: p.runner.rounds(canary.name))
    history = rig.history(canary.name)
    explained = convert.explanation_message(canary.name, rounds, history, convert.WallClock.now(rig.engine_now()))
    Console(width=250).print(render.explanation(explained))
    samples = [check.canary_samples for r in rounds for check in r.checks if check.name == "latency"]
    assert samples and samples[-1] is not None and samples[-1] >= 10, samples
    assert any(check.rule == "min-samples" for r in rounds for check in r.checks), "no round waited for samples"
    assert "rolled back v2" in rounds[-1].transitions[0]


def test_judge_promotes_an_identical_canary(rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("judge-same")
    canary.backends.set_behaviour("v1", latency_ms=STABLE_MS)
    canary.backends.set_behaviour("v2", latency_ms=STABLE_MS)
    started = time.monotonic()
    canary.start(*policy(rig))
    status = canary.wait_until_settled(55)
    story = rig.story(canary.name)
    assert status.phase is Phase.STABLE and status.stable.version == "v2", story
    [passed] = [event for event in rig.history(canary.name) if "passed" in event.reason]
    judged = {check.name: check for check in passed.checks}
    assert judged["judge"].outcome is CheckOutcome.PASS, story
    assert all(judged[name].canary_samples is not None and judged[name].canary_samples >= 10  # type: ignore[operator]
               for name in ("latency", "errors")), story
    assert canary.load is not None
    result = canary.load.stop()
    assert result.failed == 0, result.failures
    promoted_at = canary.transition_at(lambda e: e.to_phase is Phase.STABLE and e.stable_version == "v2")
    rig.record("identical_canary", write_to_promoted_s=promoted_at - canary.written_at,
               canary_samples=judged["latency"].canary_samples, stable_samples=judged["latency"].stable_samples,
               effect_ms=judged["latency"].effect, requests=result.total, test_s=time.monotonic() - started)
