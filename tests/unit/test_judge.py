"""The statistical judge: pure verdicts, their reasons, and its false-alarm rate under repeated looks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from aviary.policy.analysis import CheckOutcome
from aviary.policy.judge import (
    Allowed,
    Classification,
    Direction,
    JudgeConfig,
    JudgeMetric,
    JudgeState,
    MetricSamples,
    Rule,
    judge,
    judge_metric,
)
from aviary.policy.sequential import RankComparison, boundary, horizon_boundary
from tests.bench.judge_simulation import latency_config, simulate, spec_config

PASS, FAIL, INCONCLUSIVE = CheckOutcome.PASS, CheckOutcome.FAIL, CheckOutcome.INCONCLUSIVE

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
directions = st.sampled_from(list(Direction))
allowances = st.one_of(st.builds(Allowed, st.floats(0, 1)), st.builds(Allowed, st.floats(0, 1), st.just(True)))


def one(metric: JudgeMetric, **config: object) -> JudgeConfig:
    return JudgeConfig((metric,), **config)  # type: ignore[arg-type]


def shifted(seed: int, n: int, shift: float, scale: float = 1.0) -> MetricSamples:
    rng = np.random.default_rng(seed)
    return MetricSamples(list(rng.normal(10.0, scale, n) + shift), list(rng.normal(10.0, scale, n)))


# ----------------------------------------------------------------------------------- config


def test_allowed_parses_relative_and_absolute() -> None:
    assert Allowed.parse("10%") == Allowed(0.1, relative=True)
    assert Allowed.parse("2.5") == Allowed(2.5) == Allowed.parse(2.5)
    assert Allowed.parse("10%").absolute(-200.0) == pytest.approx(20.0)
    assert str(Allowed.parse("10%")) == "10%"
    with pytest.raises(ValueError):
        Allowed(-1.0)


@pytest.mark.parametrize("kwargs", [
    {"metrics": ()},
    {"metrics": (JudgeMetric("a"), JudgeMetric("a"))},
    {"metrics": (JudgeMetric("a"),), "alpha": 0.0},
    {"metrics": (JudgeMetric("a"),), "pass_score": 70.0, "marginal_score": 75.0},
    {"metrics": (JudgeMetric("a"),), "min_samples": 1},
    {"metrics": (JudgeMetric("a"),), "horizon": 1},
])
def test_config_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        JudgeConfig(**kwargs)  # type: ignore[arg-type]


def test_metric_alpha_is_split_between_metrics() -> None:
    assert spec_config().metric_alpha == pytest.approx(0.05 / 3)


# ------------------------------------------------------------------------- properties


horizons = st.sampled_from([None, 2, 10, 1000])


@settings(max_examples=150, deadline=None)
@given(st.lists(values, min_size=0, max_size=80), directions, allowances, st.randoms(use_true_random=False),
       st.sampled_from([None, 1000]))
def test_identical_samples_never_fail(samples: list[float], direction: Direction, allowed: Allowed,
                                      random: object, horizon: int | None) -> None:
    shuffled = list(samples)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    metric = JudgeMetric("m", direction, allowed)
    verdict = judge_metric(metric, MetricSamples(shuffled, samples), one(metric, min_samples=2, horizon=horizon))
    assert verdict.outcome is not FAIL
    if verdict.stats is not None:
        assert verdict.stats.classification is Classification.SAME
        assert verdict.stats.estimate == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 2.0), st.floats(1.0, 5.0), st.booleans(),  # 0.5 sd: power < 1
       st.sampled_from([None, 300, 600]))
def test_a_shift_beyond_the_allowed_effect_fails(seed: int, allowed: float, beyond: float, up: bool,
                                                 horizon: int | None) -> None:
    direction = Direction.INCREASE if up else Direction.DECREASE
    metric = JudgeMetric("m", direction, Allowed(allowed))
    sign = 1.0 if up else -1.0
    verdict = judge_metric(metric, shifted(seed, 300, sign * (allowed + beyond)), one(metric, horizon=horizon))
    assert verdict.outcome is FAIL
    assert verdict.rule is Rule.BEYOND_ALLOWED
    assert verdict.stats is not None
    assert verdict.stats.classification is (Classification.HIGHER if up else Classification.LOWER)
    lower, upper = verdict.stats.interval
    assert (lower > allowed) if up else (upper < -allowed)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.5, 5.0), st.booleans())
def test_a_shift_in_the_harmless_direction_passes(seed: int, size: float, up: bool) -> None:
    metric = JudgeMetric("m", Direction.DECREASE if up else Direction.INCREASE)
    verdict = judge_metric(metric, shifted(seed, 300, size if up else -size), one(metric))
    assert verdict.outcome is PASS
    assert verdict.stats is not None
    assert verdict.stats.classification is (Classification.HIGHER if up else Classification.LOWER)


non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@settings(max_examples=80, deadline=None)
@given(st.lists(non_finite, max_size=30), st.lists(st.one_of(values, non_finite), max_size=30), st.booleans(),
       horizons)
def test_nan_and_empty_series_are_inconclusive(bad: list[float], other: list[float], canary_bad: bool,
                                               horizon: int | None) -> None:
    metric = JudgeMetric("m")
    samples = MetricSamples(bad, other) if canary_bad else MetricSamples(other, bad)
    verdict = judge_metric(metric, samples, one(metric, horizon=horizon))
    assert verdict.outcome is INCONCLUSIVE
    assert verdict.rule is Rule.NO_DATA
    assert verdict.dropped == sum(not math.isfinite(v) for v in bad + other)
    must = JudgeMetric("m", must_have_data=True)
    assert judge_metric(must, samples, one(must)).outcome is FAIL


def test_a_missing_metric_has_no_data() -> None:
    verdict, _ = judge(JudgeState(), {}, one(JudgeMetric("m")))
    assert verdict.outcome is INCONCLUSIVE
    assert verdict.metrics[0].rule is Rule.NO_DATA
    assert "no data for canary and stable" in verdict.metrics[0].reason


def test_too_few_samples_are_inconclusive_however_large_the_shift() -> None:
    metric = JudgeMetric("m", min_samples=30)
    verdict = judge_metric(metric, shifted(1, 29, 1000.0), one(metric))
    assert verdict.outcome is INCONCLUSIVE
    assert verdict.rule is Rule.MIN_SAMPLES
    assert "fewer than minSamples (30)" in verdict.reason
    assert judge_metric(metric, shifted(1, 30, 1000.0), one(metric)).outcome is FAIL


def test_non_finite_values_are_dropped_and_counted() -> None:
    base = shifted(2, 40, 0.0)
    samples = MetricSamples([*base.canary, math.nan, math.nan], [*base.stable, math.inf])
    verdict = judge_metric(JudgeMetric("m"), samples, one(JudgeMetric("m")))
    assert (verdict.canary_samples, verdict.stable_samples, verdict.dropped) == (40, 40, 3)
    assert "3 non-finite dropped" in verdict.reason


# ---------------------------------------------------------------------- reasons and numbers


def test_a_verdict_carries_its_numbers_and_the_rule() -> None:
    metric = JudgeMetric("latency", Direction.INCREASE, Allowed.parse("10%"), critical=True)
    verdict = judge_metric(metric, shifted(3, 200, 3.0), one(metric))
    assert verdict.outcome is FAIL and verdict.rule is Rule.BEYOND_ALLOWED
    stats = verdict.stats
    assert stats is not None
    assert (verdict.canary_samples, verdict.stable_samples) == (200, 200)
    assert stats.interval[0] <= stats.estimate <= stats.interval[1]
    assert stats.estimate == pytest.approx(3.0, abs=0.5)
    assert stats.allowed == pytest.approx(0.1 * stats.stable_median)
    assert stats.z >= stats.boundary > 1.645
    assert stats.alpha == pytest.approx(0.05)
    assert verdict.reason.startswith("higher: an increase beyond allowed 10% (= ")
    assert "anytime boundary" in verdict.reason and "canary 200 / stable 200 samples" in verdict.reason
    assert str(verdict).startswith("latency: fail [beyond-allowed]: higher")


def test_a_small_shift_inside_the_allowed_effect_passes() -> None:
    metric = JudgeMetric("latency", Direction.INCREASE, Allowed(1.0))
    verdict = judge_metric(metric, shifted(4, 2000, 0.3), one(metric))
    assert verdict.outcome is PASS and verdict.rule is Rule.NO_EVIDENCE
    assert verdict.stats is not None
    assert 0.0 < verdict.stats.interval[0] < verdict.stats.interval[1] < 1.0  # a real shift, inside the allowance
    assert verdict.reason.startswith("same: no evidence of an increase beyond allowed 1")


def test_z_is_the_tie_corrected_mann_whitney_statistic() -> None:
    rng = np.random.default_rng(5)
    canary, stable = rng.integers(0, 5, 70).astype(float), rng.integers(0, 4, 50).astype(float)
    ours = RankComparison.of(canary, stable).z(0.5)
    theirs = scipy_stats.mannwhitneyu(canary - 0.5, stable, alternative="greater", method="asymptotic",
                                      use_continuity=False).pvalue
    assert scipy_stats.norm.sf(ours) == pytest.approx(theirs, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=25), st.lists(st.integers(-5, 5), min_size=1, max_size=25))
def test_the_estimate_is_a_median_of_the_pairwise_differences(canary: list[int], stable: list[int]) -> None:
    ranks = RankComparison.of(np.array(canary, dtype=float), np.array(stable, dtype=float))
    estimate, lower, upper = ranks.estimate_and_interval(1.0)
    differences = np.sort(np.subtract.outer(np.array(canary), np.array(stable)).ravel())
    middle = (differences.size - 1) / 2
    assert differences[math.floor(middle)] <= estimate <= differences[math.ceil(middle)]
    assert lower <= estimate <= upper


def test_the_boundary_is_wider_than_a_fixed_test_and_grows_slowly() -> None:
    assert boundary(0, 10, 0.05) == math.inf
    values = [boundary(n, n, 0.05) for n in (20, 50, 100, 1000, 100_000)]
    assert all(2.5 < v < 5.0 for v in values)
    assert values[-1] > values[1]  # like sqrt(log n): no fixed critical value is anytime-valid
    assert boundary(50, 50, 0.01) > boundary(50, 50, 0.05)


def test_the_horizon_boundary_is_obrien_fleming_in_continuous_time() -> None:
    c = scipy_stats.norm.ppf(1 - 0.05 / 2)  # 1.96: reached at the horizon
    assert horizon_boundary(0, 10, 0.05, 100) == math.inf
    assert horizon_boundary(100, 100, 0.05, 100) == pytest.approx(c)
    assert horizon_boundary(25, 25, 0.05, 100) == pytest.approx(2 * c)  # c sqrt(I_max / I)
    assert horizon_boundary(400, 400, 0.05, 100) == pytest.approx(c)  # never below c past the horizon
    assert horizon_boundary(50, 50, 0.01, 100) > horizon_boundary(50, 50, 0.05, 100)
    # Stricter than the mixture early, looser near the horizon: where the samples are saved.
    assert horizon_boundary(20, 20, 0.05, 100) > boundary(20, 20, 0.05)
    assert horizon_boundary(60, 60, 0.05, 100) < boundary(60, 60, 0.05)


def test_the_reflection_bound_holds_for_brownian_motion_watched_closely() -> None:
    """The boundary's premise, without the rank statistic: a random walk of 1,000 steps, looked at
    after every step, crosses c sqrt(I_max) with chance about 2 (1 - Phi(c)) = alpha, never more."""
    rng = np.random.default_rng(3)
    walks = rng.standard_normal((4000, 1000)).cumsum(axis=1)
    crossed = int((walks.max(axis=1) >= scipy_stats.norm.ppf(1 - 0.05 / 2) * math.sqrt(1000)).sum())
    assert crossed <= scipy_stats.binom.ppf(0.999, 4000, 0.05)


def test_past_the_horizon_the_first_samples_are_judged() -> None:
    """The test ends at the horizon: samples after it do not reopen a metric that did not cross."""
    metric = JudgeMetric("m")
    same = shifted(12, 40, 0.0)
    later = shifted(13, 400, 3.0)  # a big shift that comes only after the horizon
    samples = MetricSamples([*same.canary, *later.canary], [*same.stable, *later.stable])
    verdict = judge_metric(metric, samples, one(metric, horizon=40))
    assert verdict.outcome is PASS and verdict.stats is not None
    assert verdict.stats.classification is Classification.SAME
    assert (verdict.canary_samples, verdict.stable_samples) == (440, 440)
    assert "past the horizon: the first 40 a side judged" in verdict.reason
    assert "horizon boundary (horizon 40)" in verdict.reason
    assert judge_metric(metric, samples, one(metric)).outcome is FAIL  # the mixture keeps testing


# --------------------------------------------------------------------------------- the round


def metrics3(**latency: object) -> JudgeConfig:
    return JudgeConfig((JudgeMetric("latency", **latency),  # type: ignore[arg-type]
                        JudgeMetric("errors"), JudgeMetric("orders", Direction.DECREASE)))


def test_a_critical_failure_fails_the_round() -> None:
    same, worse = shifted(6, 100, 0.0), shifted(7, 100, 2.0)
    lenient = JudgeConfig((JudgeMetric("latency", critical=True), JudgeMetric("errors"), JudgeMetric("orders")),
                          marginal_score=0.0, pass_score=50.0)
    verdict, _ = judge(JudgeState(), {"latency": worse, "errors": same, "orders": same}, lenient)
    assert verdict.outcome is FAIL
    assert verdict.reason.startswith("critical metric failed: latency")


def test_the_score_bands() -> None:
    same, worse = shifted(6, 100, 0.0), shifted(7, 100, 2.0)
    all_same = {"latency": same, "errors": same, "orders": same}
    verdict, _ = judge(JudgeState(), all_same, metrics3())
    assert (verdict.outcome, verdict.score) == (PASS, 100.0)
    verdict, _ = judge(JudgeState(), {**all_same, "errors": worse}, metrics3())
    assert verdict.outcome is FAIL and verdict.reason == "score 66.7 < marginal (75)"
    marginal = JudgeConfig(metrics3().metrics, pass_score=95.0, marginal_score=60.0)
    verdict, _ = judge(JudgeState(), {**all_same, "errors": worse}, marginal)
    assert verdict.outcome is INCONCLUSIVE and "marginal" in verdict.reason


def test_inconclusive_metrics_leave_the_score_open() -> None:
    same = shifted(6, 100, 0.0)
    verdict, _ = judge(JudgeState(), {"latency": same, "errors": same}, metrics3())
    assert verdict.outcome is INCONCLUSIVE  # never a pass while orders has no data
    assert verdict.score_low == pytest.approx(66.7, abs=0.1)
    assert (verdict.score_high, verdict.score) == (100.0, None)
    weighted = JudgeConfig((JudgeMetric("latency", weight=20.0), JudgeMetric("errors"), JudgeMetric("orders")),
                           pass_score=90.0)
    verdict, _ = judge(JudgeState(), {"latency": same, "errors": same}, weighted)
    assert verdict.outcome is PASS  # 21/22 passed: a pass even if orders were to fail
    assert verdict.reason == "score 95.5..100 (inconclusive metrics) >= pass (90)"


def test_a_failed_metric_stays_failed_for_the_run() -> None:
    config = one(JudgeMetric("latency"))
    verdict, state = judge(JudgeState(), {"latency": shifted(8, 100, 2.0)}, config)
    assert verdict.outcome is FAIL and state.reason_failed("latency") is not None
    verdict, state2 = judge(state, {"latency": shifted(9, 100, 0.0)}, config)
    assert verdict.outcome is FAIL and verdict.metrics[0].rule is Rule.FAILED_EARLIER
    assert "failed in an earlier round" in verdict.metrics[0].reason
    assert state2 == state  # small and explicit: the names that failed and why
    fresh, _ = judge(JudgeState(), {"latency": shifted(9, 100, 0.0)}, config)
    assert fresh.outcome is PASS


# ------------------------------------------------------------------ repeated looks (light bench)

RUNS, ROUNDS, BATCH = 200, 20, 10


def test_a_a_false_rollbacks_stay_within_alpha_when_checked_every_round() -> None:
    """200 unchanged canaries judged at each of 20 rounds (10 new samples per side per round).

    If the true rate were alpha (5 %), the count of wrongly failed canaries would be Binomial(200, 0.05);
    more than its 99.9th percentile (21) would reject "rate <= 5 %" at the 0.1 % level. The seed is
    fixed, so this either always passes or always fails for a given judge.
    """
    rng = np.random.default_rng(20261202)
    config = latency_config()
    wrong = sum(simulate(config, rng, ROUNDS, BATCH, stop_on_fail=True).failed_at is not None for _ in range(RUNS))
    limit = int(scipy_stats.binom.ppf(0.999, RUNS, config.alpha))
    assert wrong <= limit, f"{wrong}/{RUNS} unchanged canaries failed; alpha {config.alpha}"


def test_a_a_false_rollbacks_stay_within_alpha_with_a_horizon_and_past_it() -> None:
    """As above with the horizon boundary: 200 samples a side planned, 30 rounds watched (100 past
    the horizon); the same Binomial(200, 0.05) bound."""
    rng = np.random.default_rng(20261203)
    config = latency_config(horizon=200)
    wrong = sum(simulate(config, rng, 30, BATCH, stop_on_fail=True).failed_at is not None for _ in range(RUNS))
    limit = int(scipy_stats.binom.ppf(0.999, RUNS, config.alpha))
    assert wrong <= limit, f"{wrong}/{RUNS} unchanged canaries failed; alpha {config.alpha}"


def test_a_30_percent_slower_canary_is_caught() -> None:
    rng = np.random.default_rng(7)
    stops = [simulate(latency_config(), rng, 40, BATCH, slower=1.3).failed_at for _ in range(40)]
    assert sum(s is not None for s in stops) >= 38  # the simulation measures ~100 % within 400 samples
    # With a horizon of 100 samples a side (twice a fixed test's 80 %-power size) power is ~97 %.
    stops = [simulate(latency_config(horizon=100), rng, 10, BATCH, slower=1.3).failed_at for _ in range(40)]
    assert sum(s is not None for s in stops) >= 34


@pytest.mark.parametrize("shift", [-2.0, 2.0])
def test_either_direction_fails_both_ways_at_half_the_alpha(shift: float) -> None:
    metric = JudgeMetric("m", Direction.EITHER)
    verdict = judge_metric(metric, shifted(10, 200, shift), one(metric))
    assert verdict.outcome is FAIL and verdict.stats is not None
    assert verdict.stats.alpha == pytest.approx(0.025)
    assert verdict.reason.startswith("higher: a change" if shift > 0 else "lower: a change")


def test_a_relative_allowance_scales_with_the_stable_median() -> None:
    rng = np.random.default_rng(11)
    stable = list(rng.lognormal(5.0, 0.5, 400))
    canary = list(rng.lognormal(5.0, 0.5, 400) * 1.3)
    tolerant = JudgeMetric("latency", allowed=Allowed.parse("60%"))
    strict = JudgeMetric("latency", allowed=Allowed.parse("5%"))
    assert judge_metric(tolerant, MetricSamples(canary, stable), one(tolerant)).outcome is PASS
    assert judge_metric(strict, MetricSamples(canary, stable), one(strict)).outcome is FAIL
