"""The threshold evaluator: outcomes, worst-wins order, readable reasons, counters."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviary.policy.analysis import (
    CheckOutcome,
    CheckResult,
    Counters,
    Thresholds,
    failure_limit_reason,
    inconclusive,
    inconclusive_limit_reason,
    judge,
    round_outcome,
    worst,
)
from aviary.policy.schema import Analysis, MetricCheck

PASS, FAIL, INCONCLUSIVE = CheckOutcome.PASS, CheckOutcome.FAIL, CheckOutcome.INCONCLUSIVE

SUCCESS = MetricCheck(name="success", template="request-success-rate", min=99.0)
LATENCY = MetricCheck(name="p99", template="request-duration-p99", max=250.0)
VS_STABLE = MetricCheck(name="vs-stable", template="request-success-rate", maxDecreaseFromStable=1.0)
BOTH = MetricCheck(name="both", template="request-success-rate", min=95.0, maxDecreaseFromStable=1.0)


def analysis(**kwargs: object) -> Analysis:
    return Analysis.model_validate({"metrics": [SUCCESS], **kwargs})


# ------------------------------------------------------------------------------------ ordering


def test_worst_wins_order_is_explicit() -> None:
    assert [o.severity for o in (PASS, INCONCLUSIVE, FAIL)] == [0, 1, 2]
    assert worst([PASS, INCONCLUSIVE, PASS]) is INCONCLUSIVE
    assert worst([INCONCLUSIVE, FAIL, PASS]) is FAIL
    assert worst([PASS, PASS]) is PASS


def test_nothing_judged_is_not_a_pass() -> None:
    assert worst([]) is INCONCLUSIVE
    assert round_outcome(()) is INCONCLUSIVE


@given(st.lists(st.sampled_from(list(CheckOutcome)), min_size=1))
def test_worst_is_order_independent_and_fail_dominates(outcomes: list[CheckOutcome]) -> None:
    assert worst(outcomes) is worst(list(reversed(outcomes)))
    if FAIL in outcomes:
        assert worst(outcomes) is FAIL
    elif INCONCLUSIVE in outcomes:
        assert worst(outcomes) is INCONCLUSIVE
    else:
        assert worst(outcomes) is PASS


# --------------------------------------------------------------------------------------- judge


def test_pass_within_min() -> None:
    result = judge(SUCCESS, 99.5, None, 100, 20)
    assert result == CheckResult("success", PASS, 99.5, None, Thresholds(min=99.0), "99.5 >= min (99)")


def test_fail_below_min() -> None:
    result = judge(SUCCESS, 80.0, None, 100, 20)
    assert result.outcome is FAIL
    assert result.reason == "80 < min (99)"


def test_max_threshold() -> None:
    assert judge(LATENCY, 120.0, None, 50, 20).outcome is PASS
    failed = judge(LATENCY, 251.5, None, 50, 20)
    assert (failed.outcome, failed.reason) == (FAIL, "251.5 > max (250)")


def test_threshold_bounds_are_inclusive() -> None:
    assert judge(SUCCESS, 99.0, None, 20, 20).outcome is PASS
    assert judge(LATENCY, 250.0, None, 20, 20).outcome is PASS


@pytest.mark.parametrize(("value", "reason"), [(None, "value: no data"), (math.nan, "value: NaN")])
def test_no_value_is_inconclusive(value: float | None, reason: str) -> None:
    result = judge(SUCCESS, value, None, 100, 20)
    assert (result.outcome, result.reason) == (INCONCLUSIVE, reason)


def test_nan_latency_never_passes() -> None:
    # Envoy records no upstream_rq_time for connection failures: p99 is NaN while every request fails.
    assert judge(LATENCY, math.nan, None, 500, 20).outcome is INCONCLUSIVE


@pytest.mark.parametrize(("requests", "reason"), [
    (19, "canary requests (19) < minRequests (20)"),
    (0, "canary requests (0) < minRequests (20)"),
    (None, "no request count for the canary"),
    (math.nan, "no request count for the canary"),
])
def test_too_little_traffic_is_inconclusive(requests: float | None, reason: str) -> None:
    # Even a value that would pass, or fail, is not judged on too few requests.
    for value in (100.0, 0.0):
        result = judge(SUCCESS, value, None, requests, 20)
        assert (result.outcome, result.reason) == (INCONCLUSIVE, reason)


def test_min_requests_zero_skips_the_traffic_gate() -> None:
    assert judge(SUCCESS, 100.0, None, None, 0).outcome is PASS


def test_max_decrease_from_stable() -> None:
    ok = judge(VS_STABLE, 98.5, 99.0, 100, 20)
    assert ok.outcome is PASS
    assert ok.reason == "decrease from stable 99 is 0.5 <= maxDecreaseFromStable (1)"
    bad = judge(VS_STABLE, 97.0, 99.5, 100, 20)
    assert (bad.outcome, bad.reason) == (FAIL, "decrease from stable 99.5 is 2.5 > maxDecreaseFromStable (1)")
    better = judge(VS_STABLE, 100.0, 90.0, 100, 20)
    assert better.outcome is PASS


@pytest.mark.parametrize("stable", [None, math.nan])
def test_missing_stable_value_is_inconclusive(stable: float | None) -> None:
    result = judge(VS_STABLE, 99.0, stable, 100, 20)
    assert result.outcome is INCONCLUSIVE
    assert result.reason.startswith("stable value: ")


def test_a_broken_threshold_fails_even_when_the_stable_value_is_missing() -> None:
    result = judge(BOTH, 50.0, None, 100, 20)
    assert (result.outcome, result.reason) == (FAIL, "50 < min (95)")
    assert judge(BOTH, 99.0, None, 100, 20).outcome is INCONCLUSIVE
    assert judge(BOTH, 99.0, 99.5, 100, 20).outcome is PASS


def test_result_keeps_values_and_thresholds() -> None:
    result = judge(BOTH, 96.0, 99.0, 100, 20)
    assert result.outcome is FAIL
    assert (result.value, result.stable_value) == (96.0, 99.0)
    assert result.thresholds == Thresholds(min=95.0, max_decrease_from_stable=1.0)
    assert str(result) == "both: fail: decrease from stable 99 is 3 > maxDecreaseFromStable (1)"


def test_inconclusive_helper() -> None:
    result = inconclusive(LATENCY, "Prometheus unreachable")
    assert result == CheckResult("p99", INCONCLUSIVE, None, None, Thresholds(max=250.0), "Prometheus unreachable")


@given(value=st.floats(allow_nan=True), requests=st.one_of(st.none(), st.floats(allow_nan=True)))
def test_judge_never_passes_without_a_number_and_enough_requests(value: float, requests: float | None) -> None:
    result = judge(SUCCESS, value, None, requests, 20)
    if result.outcome is PASS:
        assert not math.isnan(value) and value >= 99.0
        assert requests is not None and requests >= 20


# ------------------------------------------------------------------------------------ counters


def test_counters_failures_accumulate_and_inconclusive_is_consecutive() -> None:
    c = Counters()
    for outcome in (INCONCLUSIVE, INCONCLUSIVE, FAIL, INCONCLUSIVE, PASS, FAIL):
        c = c.record(outcome)
    assert c == Counters(passed=1, failed=2, inconclusive=0)
    c = c.record(INCONCLUSIVE).record(INCONCLUSIVE)
    assert c.inconclusive == 2
    assert c.without_inconclusive() == Counters(passed=1, failed=2, inconclusive=0)


def test_limits_are_exceeded_strictly_and_reasons_read_well() -> None:
    a = analysis(failureLimit=1, inconclusiveLimit=3)
    c = Counters(failed=1, inconclusive=3)
    assert not c.over_failure_limit(a) and not c.over_inconclusive_limit(a)
    c = Counters(failed=2, inconclusive=4)
    assert c.over_failure_limit(a) and c.over_inconclusive_limit(a)
    assert failure_limit_reason(c, a) == "failed (2) > failureLimit (1)"
    assert inconclusive_limit_reason(c, a) == "inconclusive (4) > inconclusiveLimit (3)"


def test_default_failure_limit_rolls_back_on_first_failure() -> None:
    assert Counters().record(FAIL).over_failure_limit(analysis())
