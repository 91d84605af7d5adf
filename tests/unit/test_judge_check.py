"""``analysis.judge`` end to end without I/O: its spelling, the ``JudgeCheck`` kind (plan, judge,
results) and what the rollout machine does with its rounds (state, waiting for samples)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from aviary.metrics.checks import run_checks
from aviary.metrics.kinds import JudgeCheck, RoundContext, checks_of, judge_config, judge_horizon, judge_window
from aviary.metrics.provider import MetricProviderError
from aviary.metrics.templates import Side
from aviary.policy.analysis import CheckOutcome, CheckResult, gathering, round_outcome
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout import ChecksCompleted, Phase, SpecObserved, WeightAcked, step
from aviary.policy.rollout_machine import guard_analysis
from aviary.policy.schema import Analysis, RolloutSpec
from tests.rig.policies import rollout_doc

CANARY = Side("shop_v2", "v2", 50)
STABLE = Side("shop_v1", "v1", 50)

JUDGE: dict[str, Any] = {
    "metrics": [
        {"name": "latency", "template": "request-duration-p99", "direction": "increase", "allowed": "10%",
         "critical": True},
        {"name": "errors", "template": "error-rate-5xx", "direction": "increase"},
    ],
    "pass": 95, "marginal": 75, "minSamples": 10, "step": "2s",
}


def analysis(judge: dict[str, Any] | None = None, **kwargs: Any) -> Analysis:
    return Analysis.model_validate({"window": "30s", "minRequests": 0, "judge": judge or JUDGE, **kwargs})


@dataclass
class Series:
    """A provider answering range queries from a dict (query -> samples or an exception)."""

    values: dict[str, tuple[float, ...] | Exception]
    asked: list[tuple[str, float, float]] = field(default_factory=list)

    async def query_scalar(self, query: str, timeout: float) -> float | None:
        return 100.0  # the request count

    async def query_series(self, query: str, window: float, step: float, timeout: float) -> tuple[float, ...]:
        self.asked.append((query, window, step))
        value = self.values.get(query, ())
        if isinstance(value, Exception):
            raise value
        return value


def answers_for(check: JudgeCheck, context: RoundContext, by_metric: dict[str, tuple[list[float], list[float]]]
                ) -> dict[str, tuple[float, ...] | Exception]:
    asks = check.plan(context)
    out: dict[str, tuple[float, ...] | Exception] = {}
    for index, metric in enumerate(check.spec.metrics):
        canary, stable = by_metric.get(metric.name, ([], []))
        out[asks[2 * index].query] = tuple(canary)
        out[asks[2 * index + 1].query] = tuple(stable)
    return out


def judged(values: dict[str, tuple[list[float], list[float]]], since: float | None = 60.0,
           failed: tuple[tuple[str, str], ...] = ()) -> dict[str, CheckResult]:
    spec = analysis()
    check = JudgeCheck(spec.judge)  # type: ignore[arg-type]
    context = RoundContext(spec, CANARY, STABLE, since, failed)
    provider = Series(answers_for(check, context, values))
    results = asyncio.run(run_checks(provider, spec, CANARY, STABLE, since=since, judge_failed=failed))
    return {result.name: result for result in results}


SLOW = [52.0 + i * 0.1 for i in range(25)]
FAST = [40.0 + i * 0.1 for i in range(25)]
ZEROS = [0.0] * 25


# ----------------------------------------------------------------------------------------- spelling


def test_the_issue_spelling_parses_with_defaults() -> None:
    spec = analysis({"metrics": [{"name": "orders", "query": 'sum(rate(orders{v="{{ canary_version }}"}[1m]))',
                                  "direction": "decrease", "mustHaveData": True}]})
    assert spec.metrics == () and spec.judge is not None
    assert (spec.judge.pass_score, spec.judge.marginal, spec.judge.alpha, spec.judge.min_samples,
            spec.judge.step, spec.judge.max_window) == (95, 75, 0.05, 20, 5.0, 3600.0)
    [orders] = spec.judge.metrics
    assert (orders.direction, orders.must_have_data, orders.allowed, orders.critical) == ("decrease", True, 0.0, False)
    assert [check.kind for check in checks_of(spec)] == ["judge"]


@pytest.mark.parametrize(("judge", "field", "reason"), [
    ({"metrics": []}, "spec.analysis.judge.metrics", "at least 1"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99", "allowed": "ten"}]},
     "spec.analysis.judge.metrics[0].allowed", "percentage"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99", "allowed": "-5%"}]},
     "spec.analysis.judge.metrics[0].allowed", ">= 0"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99", "direction": "up"}]},
     "spec.analysis.judge.metrics[0].direction", "increase"),
    ({"metrics": [{"name": "l", "query": "sum(rate(x[1m]))"}]},
     "spec.analysis.judge.metrics[0].query", "{{ canary }}"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99"}], "pass": 70},
     "spec.analysis.judge.marginal", "greater than pass"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99"}], "step": "fast"},
     "spec.analysis.judge.step", "duration"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99"}], "minSamples": 1},
     "spec.analysis.judge.minSamples", "2"),
    ({"metrics": [{"name": "judge", "template": "request-duration-p99"}]},
     "spec.analysis.judge.metrics[0].name", "verdict"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99", "mustHaveData": "yes"}]},
     "spec.analysis.judge.metrics[0].mustHaveData", "bool"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99"}], "horizon": 1},
     "spec.analysis.judge.horizon", "2"),
    ({"metrics": [{"name": "l", "template": "request-duration-p99"}], "horizon": 15},
     "spec.analysis.judge.horizon", "at least minSamples (20)"),
])
def test_bad_judge_blocks_name_file_and_field(judge: dict[str, Any], field: str, reason: str) -> None:
    doc = rollout_doc()
    doc["spec"]["analysis"] = {"prometheus": "http://127.0.0.1:9090", "judge": judge}
    import yaml

    rollout, errors = parse_policy_text(yaml.safe_dump(doc), "p.yaml")
    assert rollout is None
    assert [(e.file, e.field) for e in errors] == [("p.yaml", field)], errors
    assert reason in errors[0].reason, errors
    assert "\n" not in str(errors[0])


def _judge_of(strategy: dict[str, Any], **judge: Any) -> Any:
    import yaml

    doc = rollout_doc()
    doc["spec"]["strategy"] = strategy
    doc["spec"]["analysis"] = {"prometheus": "http://127.0.0.1:9090", "judge": {**JUDGE, **judge}}
    rollout, errors = parse_policy_text(yaml.safe_dump(doc), "p.yaml")
    assert rollout is not None and rollout.spec.analysis is not None, errors
    return rollout.spec.analysis.judge


def test_the_horizon_is_the_samples_the_strategy_plans_for() -> None:
    # Two weight steps of 60 s and a timed pause of 30 s: 150 s at one sample per 2 s step.
    judge = _judge_of({"steps": [20, {"pause": {"duration": "30s"}}, 50], "interval": "60s"})
    assert judge.planned_seconds == 150.0
    assert judge_horizon(judge) == 75 and judge_config(judge).horizon == 75
    # A manual pause adds nothing; maxWindow caps it (older samples drop out); minSamples floors it.
    assert judge_horizon(_judge_of({"steps": [20, {"pause": {}}], "interval": "60s"})) == 30
    assert judge_horizon(_judge_of({"steps": [20, 50], "interval": "1h"}, maxWindow="100s")) == 50
    assert judge_horizon(_judge_of({"steps": [50], "interval": "10s"})) == 10  # the e2e's: 5 planned, minSamples 10
    # Given explicitly, it wins; without a strategy (a bare Analysis) the judge has no horizon.
    assert judge_horizon(_judge_of({"steps": [50], "interval": "10s"}, horizon=400)) == 400
    assert judge_horizon(analysis().judge) is None  # type: ignore[arg-type]


def test_neither_metrics_nor_judge_is_an_error() -> None:
    with pytest.raises(ValueError, match="metrics, or a judge"):
        Analysis.model_validate({"metrics": []})


def test_a_judge_metric_may_not_reuse_a_threshold_check_name() -> None:
    with pytest.raises(ValueError, match="also metrics"):
        analysis(metrics=[{"name": "latency", "template": "request-duration-p99", "max": 500}])


# ------------------------------------------------------------------------------------------- the kind


def test_the_plan_is_two_series_per_metric_over_the_step_since_the_canary_started() -> None:
    spec = analysis()
    check = JudgeCheck(spec.judge)  # type: ignore[arg-type]
    asks = check.plan(RoundContext(spec, CANARY, STABLE, since=43.0))
    assert len(asks) == 4
    assert {(ask.window, ask.step) for ask in asks} == {(43.0, 2.0)}
    assert 'envoy_cluster_name="shop_v2"' in asks[0].query and "[2s]" in asks[0].query
    assert 'envoy_cluster_name="shop_v1"' in asks[1].query
    # Unknown start: minSamples steps back; always at least two steps, at most maxWindow.
    assert judge_window(spec.judge, None) == 20.0  # type: ignore[arg-type]
    assert judge_window(spec.judge, 0.5) == 4.0  # type: ignore[arg-type]
    assert judge_window(spec.judge, 1e9) == 3600.0  # type: ignore[arg-type]


def test_a_slower_canary_fails_the_critical_metric_and_the_round() -> None:
    results = judged({"latency": (SLOW, FAST), "errors": (ZEROS, ZEROS)})
    latency, verdict = results["latency"], results["judge"]
    assert (latency.outcome, latency.rule, latency.kind, latency.counted) == (
        CheckOutcome.FAIL, "beyond-allowed", "judge", False)
    assert (latency.canary_samples, latency.stable_samples) == (25, 25)
    assert latency.effect is not None and latency.effect == pytest.approx(12.0, abs=0.5)
    assert latency.effect_interval is not None and latency.effect_interval[0] > 0
    assert latency.queries and "shop_v2" in latency.queries[0]
    assert verdict.outcome is CheckOutcome.FAIL and "critical metric failed: latency" in verdict.reason
    assert round_outcome(results.values()) is CheckOutcome.FAIL


def test_an_identical_canary_passes() -> None:
    results = judged({"latency": (FAST, FAST), "errors": (ZEROS, ZEROS)})
    assert results["judge"].outcome is CheckOutcome.PASS
    assert results["latency"].rule == "no-evidence"
    assert round_outcome(results.values()) is CheckOutcome.PASS


def test_short_of_samples_says_which_metric_and_how_many() -> None:
    results = judged({"latency": (FAST[:7], FAST[:9]), "errors": (ZEROS, ZEROS)})
    verdict = results["judge"]
    assert (verdict.outcome, verdict.rule) == (CheckOutcome.INCONCLUSIVE, "min-samples")
    assert verdict.reason.startswith("waiting for samples: latency 7/10")
    assert gathering(results.values())


def test_a_provider_error_is_inconclusive_never_a_failure() -> None:
    spec = analysis()
    check = JudgeCheck(spec.judge)  # type: ignore[arg-type]
    context = RoundContext(spec, CANARY, STABLE, 60.0)
    values = answers_for(check, context, {"latency": (SLOW, FAST)})
    values[check.plan(context)[2].query] = MetricProviderError("prometheus down")
    results = asyncio.run(run_checks(Series(values), spec, CANARY, STABLE, since=60.0))
    assert {result.outcome for result in results} == {CheckOutcome.INCONCLUSIVE}
    assert not gathering(results)


def test_a_metric_that_failed_earlier_stays_failed() -> None:
    results = judged({"latency": (FAST, FAST), "errors": (ZEROS, ZEROS)},
                     failed=(("latency", "slower then"),))
    assert (results["latency"].outcome, results["latency"].rule) == (CheckOutcome.FAIL, "failed-earlier")
    assert results["judge"].outcome is CheckOutcome.FAIL


def test_the_after_promotion_window_drops_the_judge() -> None:
    assert guard_analysis(analysis()) is None
    both = analysis(metrics=[{"name": "ok", "template": "request-success-rate", "min": 99}])
    guarded = guard_analysis(both)
    assert guarded is not None and guarded.judge is None and [m.name for m in guarded.metrics] == ["ok"]


# -------------------------------------------------------------------------------------- the machine


def spec_with_judge(version: str) -> RolloutSpec:
    doc = rollout_doc(version=version, steps=(50,))["spec"]
    doc["strategy"]["interval"] = "10s"
    doc["analysis"] = {"checkEvery": "2s", "window": "10s", "minRequests": 0, "inconclusiveLimit": 1,
                       "failureLimit": 1, "judge": JUDGE}
    return RolloutSpec.model_validate(doc)


def round_of(values: dict[str, tuple[list[float], list[float]]], failed: tuple[tuple[str, str], ...] = ()
             ) -> tuple[CheckResult, ...]:
    return tuple(judged(values, failed=failed).values())


def test_rounds_short_of_samples_hold_the_step_without_counting_as_inconclusive() -> None:
    v1, v2 = spec_with_judge("v1"), spec_with_judge("v2")
    status, _ = step(v1, None, SpecObserved(v1), 0.0, rollout="shop")
    status, _ = step(v2, status, SpecObserved(v2), 1.0)
    status, _ = step(v2, status, WeightAcked("v2", 50, 1.0), 1.0)
    assert status.canary_started_at == 1.0
    short = round_of({"latency": (FAST[:5], FAST[:5]), "errors": (ZEROS[:5], ZEROS[:5])})
    for now in (3.0, 5.0, 7.0, 12.0, 14.0):  # more rounds than inconclusiveLimit, past the interval
        status, _ = step(v2, status, ChecksCompleted(short, now), now)
    assert (status.phase, status.step_index, status.counters.inconclusive) == (Phase.PROGRESSING, 0, 0)
    status, _ = step(v2, status, ChecksCompleted(round_of({"latency": (FAST, FAST), "errors": (ZEROS, ZEROS)}),
                                                 16.0), 16.0)
    assert status.phase is Phase.PROMOTING  # the only step passed


def test_a_failed_judged_metric_is_remembered_for_the_run_and_reset_by_a_new_canary() -> None:
    v1, v2 = spec_with_judge("v1"), spec_with_judge("v2")
    status, _ = step(v1, None, SpecObserved(v1), 0.0, rollout="shop")
    status, _ = step(v2, status, SpecObserved(v2), 1.0)
    status, _ = step(v2, status, WeightAcked("v2", 50, 1.0), 1.0)
    # errors (not critical) fails: score 50 < marginal, a failed round within failureLimit 1.
    slow_errors = round_of({"latency": (FAST, FAST), "errors": ([5.0] * 25, ZEROS)})
    status, _ = step(v2, status, ChecksCompleted(slow_errors, 3.0), 3.0)
    assert status.phase is Phase.PROGRESSING
    assert [name for name, _ in status.judge_failed] == ["errors"]
    v3 = spec_with_judge("v3")
    status, _ = step(v3, status, SpecObserved(v3), 4.0)
    assert status.judge_failed == () and status.canary_started_at is None


# --------------------------------------------------------------------------------- status, restart


def test_status_says_which_metric_is_short_of_samples() -> None:
    import io

    from rich.console import Console

    from aviary.admin import render
    from aviary.admin.convert import check_message
    from aviary.admin.v1 import admin_pb2 as pb

    results = judged({"latency": (FAST[:7], FAST[:9]), "errors": (ZEROS, ZEROS)})
    rollout = pb.Rollout(name="shop", phase="Progressing", stable_version="v1", canary_version="v2", weight=50,
                         step=1, steps=1, checks=[check_message(result) for result in results.values()])
    out = io.StringIO()
    Console(file=out, width=400).print(render.rollout_detail(rollout))
    text = out.getvalue()
    assert re.search(r"samples +waiting for samples: latency 7/10 \(canary/stable, the fewer\)", text), text
    assert "[min-samples]" in text and "(shown)" in text
    assert check_message(results["latency"]).shown_only and not check_message(results["judge"]).shown_only


def test_a_restart_restarts_the_judges_samples_but_keeps_its_failures() -> None:
    from dataclasses import replace

    from aviary.runner import stopped_for_restart

    v1, v2 = spec_with_judge("v1"), spec_with_judge("v2")
    status, _ = step(v1, None, SpecObserved(v1), 0.0, rollout="shop")
    status, _ = step(v2, status, SpecObserved(v2), 1.0)
    status, _ = step(v2, status, WeightAcked("v2", 50, 1.0), 1.0)
    status = replace(status, judge_failed=(("errors", "higher then"),))
    restored, _ = stopped_for_restart(status, 5.0)
    assert restored.canary_started_at is None and restored.judge_failed == (("errors", "higher then"),)
    acked, _ = step(v2, restored, WeightAcked("v2", 50, 100.0), 100.0)
    assert acked.canary_started_at == 100.0


def test_a_failing_threshold_check_counts_even_while_the_judge_waits_for_samples() -> None:
    from aviary.policy.analysis import Thresholds

    short = round_of({"latency": (FAST[:5], FAST[:5]), "errors": (ZEROS[:5], ZEROS[:5])})
    broken = CheckResult("success", CheckOutcome.FAIL, 90.0, None, Thresholds(min=99.0), "90 < min (99)")
    assert gathering(short) and not gathering((broken, *short))
    assert round_outcome((broken, *short)) is CheckOutcome.FAIL
