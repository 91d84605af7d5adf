"""Check kinds: each plans the queries it needs and judges their answers into results.

A check round (``aviary.metrics.checks``) is kind-agnostic: it asks every kind for its plan (a
tuple of ``Ask``), runs the distinct asks at once against the providers, and hands each kind its
answers, in the order it planned them. So a new kind is one class with three methods
(``Check``), constructed from its policy block and listed by ``checks_of``:

- ``ThresholdCheck`` (``kind: threshold``): the canary's value against ``min``/``max``, plus
  today's ``maxDecreaseFromStable``; judged by ``aviary.policy.analysis.judge``.
- ``CompareCheck`` (``kind: compare``): the same query for canary and stable over the same window,
  bounded by ratio or difference; judged by ``aviary.policy.analysis.judge_compare``.
- ``JudgeCheck`` (``analysis.judge``): every judged metric as two sample series (canary, stable)
  since the canary started, compared by the sequential rank test of ``aviary.policy.judge``.

A statistical kind plans series asks (``Ask.window``/``Ask.step`` set: a range query at the
scrape step) for canary and stable per metric, and reports sample counts in its results.
Verdicts stay pure functions in ``aviary.policy``; this module only wires them to queries.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aviary.metrics.envoy_query import REQUEST_COUNT, EnvoyQuery
from aviary.metrics.provider import MetricProviderError
from aviary.metrics.templates import Side, TemplateError, render, request_count_query
from aviary.policy import judge as judging
from aviary.policy.analysis import GATHERING, CheckOutcome, CheckResult, Thresholds, inconclusive, judge, judge_compare
from aviary.policy.schema import JUDGE_VERDICT, Analysis, JudgeMetricSpec, JudgeSpec, MetricCheck

__all__ = [
    "ENVOY",
    "PROMETHEUS",
    "WEB",
    "Answer",
    "Ask",
    "Check",
    "CompareCheck",
    "JudgeCheck",
    "RoundContext",
    "ThresholdCheck",
    "check_of",
    "checks_of",
    "judge_config",
    "judge_horizon",
    "judge_window",
    "request_count_ask",
]

PROMETHEUS = "prometheus"
WEB = "web"
ENVOY = "envoy"


@dataclass(frozen=True, slots=True)
class Ask:
    """One query for one provider. ``window``/``step`` set: a sample series (seconds back from now,
    seconds between samples); unset: one number (an instant query)."""

    source: str
    query: str
    window: float | None = None
    step: float | None = None


Answer = float | tuple[float, ...] | MetricProviderError | None
"""What a provider answered to an Ask: a number, samples, no data (None), or its error."""


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What every check of a round shares: the analysis and the two sides it measures."""

    analysis: Analysis
    canary: Side
    stable: Side
    since: float | None = None
    """Seconds since the canary's first step started (the judge's samples reach back that far);
    None: unknown, the judge then looks back ``minSamples`` steps."""
    judge_failed: tuple[tuple[str, str], ...] = ()
    """Judged metrics that failed in an earlier round of this canary, with the reason then."""


class Check(Protocol):
    """One check of the analysis, of some kind, built from its policy block.

    ``plan`` returns the asks (may raise ``TemplateError``: the round reports it through
    ``unanswered``). ``judge`` gets the answers in plan order and the canary's request count
    (None when unknown) and returns its results: one per metric it covers, never raising;
    ``unanswered`` returns the same results, INCONCLUSIVE with ``reason``.
    """

    @property
    def kind(self) -> str: ...

    def plan(self, context: RoundContext) -> tuple[Ask, ...]: ...

    def judge(self, context: RoundContext, answers: Sequence[Answer],
              canary_requests: float | None) -> tuple[CheckResult, ...]: ...

    def unanswered(self, reason: str) -> tuple[CheckResult, ...]: ...


def _ask(metric: MetricCheck | JudgeMetricSpec, analysis: Analysis, measured: Side, other: Side,
         window: float) -> Ask:
    """The query of ``metric`` for the ``measured`` side over ``window``, for the provider that answers
    it: a web check's own service, else ``analysis.provider`` (PromQL, or an ``EnvoyQuery``)."""
    if isinstance(metric, MetricCheck) and metric.web is not None:
        return Ask(WEB, render(metric, measured, other, window, analysis.version_label))
    if analysis.provider == ENVOY:
        if metric.template is None:
            raise TemplateError(f"check {metric.name!r}: the envoy provider answers templates only")
        return Ask(ENVOY, EnvoyQuery.of(metric.template, measured, window).text())
    return Ask(PROMETHEUS, render(metric, measured, other, window, analysis.version_label))


def request_count_ask(analysis: Analysis, cluster: str) -> Ask:
    """The canary's request count over the window (for minRequests), from the analysis' provider."""
    if analysis.provider == ENVOY:
        return Ask(ENVOY, EnvoyQuery(REQUEST_COUNT, cluster, analysis.window).text())
    return Ask(PROMETHEUS, request_count_query(cluster, analysis.window))


def _render(metric: MetricCheck, context: RoundContext, measured: Side, other: Side) -> Ask:
    return _ask(metric, context.analysis, measured, other, context.analysis.window)


def _error(answers: Sequence[Answer]) -> MetricProviderError | None:
    return next((answer for answer in answers if isinstance(answer, MetricProviderError)), None)


def _scalar(answer: Answer) -> float | None:
    if isinstance(answer, tuple):  # a kind that plans scalars never gets samples; be safe anyway
        return answer[-1] if answer else None
    if isinstance(answer, MetricProviderError):
        return None
    return answer


@dataclass(frozen=True, slots=True)
class ThresholdCheck:
    """Today's check: ``min``/``max`` on the canary's value, ``maxDecreaseFromStable`` against stable's."""

    metric: MetricCheck
    kind: str = "threshold"

    def plan(self, context: RoundContext) -> tuple[Ask, ...]:
        value = _render(self.metric, context, context.canary, context.stable)
        if self.metric.template is None or self.metric.max_decrease_from_stable is None:
            return (value,)
        return value, _render(self.metric, context, context.stable, context.canary)

    def judge(self, context: RoundContext, answers: Sequence[Answer],
              canary_requests: float | None) -> tuple[CheckResult, ...]:
        def verdict() -> CheckResult:
            stable = _scalar(answers[1]) if len(answers) > 1 else None
            return judge(self.metric, _scalar(answers[0]), stable, canary_requests, context.analysis.min_requests)

        return _scalar_result(self.metric, self.plan(context), answers, verdict)

    def unanswered(self, reason: str) -> tuple[CheckResult, ...]:
        return (inconclusive(self.metric, reason),)


@dataclass(frozen=True, slots=True)
class CompareCheck:
    """Canary vs stable on the same query over the same window, by ratio or difference."""

    metric: MetricCheck
    kind: str = "compare"

    def plan(self, context: RoundContext) -> tuple[Ask, ...]:
        canary = _render(self.metric, context, context.canary, context.stable)
        stable = _render(self.metric, context, context.stable, context.canary)
        if canary == stable:
            raise TemplateError(f"check {self.metric.name!r}: canary and stable render the same query; "
                                "select the version with {{ canary }} or {{ canary_version }}")
        return canary, stable

    def judge(self, context: RoundContext, answers: Sequence[Answer],
              canary_requests: float | None) -> tuple[CheckResult, ...]:
        def verdict() -> CheckResult:
            return judge_compare(self.metric, _scalar(answers[0]), _scalar(answers[1]), canary_requests,
                                 context.analysis.min_requests)

        return _scalar_result(self.metric, self.plan(context), answers, verdict)

    def unanswered(self, reason: str) -> tuple[CheckResult, ...]:
        return (inconclusive(self.metric, reason),)


def _scalar_result(metric: MetricCheck, asks: Sequence[Ask], answers: Sequence[Answer],
                   verdict: Callable[[], CheckResult]) -> tuple[CheckResult, ...]:
    """A scalar check's one result: inconclusive with the first provider error, else ``verdict()``;
    either way carrying the rendered queries."""
    error = _error(answers)
    result = inconclusive(metric, str(error)) if error is not None else verdict()
    return (dataclasses.replace(result, queries=tuple(ask.query for ask in asks)),)


def check_of(metric: MetricCheck) -> Check:
    """The check of one ``analysis.metrics`` entry, by its kind."""
    return CompareCheck(metric) if metric.compare is not None else ThresholdCheck(metric)


def checks_of(analysis: Analysis) -> tuple[Check, ...]:
    """Every check a round of ``analysis`` runs, in policy order, the ``judge`` block last."""
    judged: tuple[Check, ...] = (JudgeCheck(analysis.judge),) if analysis.judge is not None else ()
    return tuple(check_of(metric) for metric in analysis.metrics) + judged


def judge_config(spec: JudgeSpec) -> judging.JudgeConfig:
    """The pure judge's configuration for ``analysis.judge``."""
    metrics = tuple(
        judging.JudgeMetric(metric.name, judging.Direction(metric.direction), judging.Allowed.parse(metric.allowed),
                            metric.critical, metric.must_have_data, metric.weight, metric.min_samples)
        for metric in spec.metrics)
    return judging.JudgeConfig(metrics, spec.pass_score, spec.marginal, spec.alpha, spec.min_samples,
                               horizon=judge_horizon(spec))


def judge_horizon(spec: JudgeSpec) -> int | None:
    """Samples per side the judge's test is planned for: ``horizon`` if given, else one per ``step``
    over the strategy's planned duration, at most ``maxWindow / step`` (older samples drop out of
    the window) and at least the largest ``minSamples`` (a step waits for those). None when no
    strategy is known: the judge then uses its boundary without a horizon."""
    if spec.horizon is not None:
        return spec.horizon
    if spec.planned_seconds is None:
        return None
    least = max([spec.min_samples, *(m.min_samples for m in spec.metrics if m.min_samples is not None)])
    planned = math.ceil(spec.planned_seconds / spec.step - 1e-9)
    return max(least, min(planned, math.floor(spec.max_window / spec.step + 1e-9)))


def judge_window(spec: JudgeSpec, since: float | None) -> float:
    """Seconds of samples a judge round asks for: since the canary started, at least two steps,
    at most ``maxWindow`` (older samples then drop out)."""
    wanted = since if since is not None and math.isfinite(since) else spec.step * spec.min_samples
    return min(spec.max_window, max(2 * spec.step, wanted))


def _samples(answer: Answer) -> tuple[float, ...]:
    if isinstance(answer, tuple):
        return answer
    if answer is None or isinstance(answer, MetricProviderError):
        return ()
    return (answer,)


def _median(values: Sequence[float]) -> float | None:
    finite = [value for value in values if math.isfinite(value)]
    return statistics.median(finite) if finite else None


@dataclass(frozen=True, slots=True)
class JudgeCheck:
    """``analysis.judge``: per metric, canary and stable sample series since the canary started.

    A sample is the metric's query evaluated over one ``step`` (its ``[{{ window }}]`` is the step)
    at every step of a range query: disjoint sub-windows, so the samples of a side are roughly
    independent, as the rank test assumes. Its results are one per metric (shown, not counted: the
    judge scores them) and the verdict (named ``judge``), which is what the round counts. A verdict
    still short of samples carries the rule ``min-samples``: the round does not count as
    inconclusive and the step waits.
    """

    spec: JudgeSpec
    kind: str = "judge"

    def _render(self, metric: JudgeMetricSpec, context: RoundContext, measured: Side, other: Side) -> Ask:
        ask = _ask(metric, context.analysis, measured, other, self.spec.step)
        return dataclasses.replace(ask, window=judge_window(self.spec, context.since), step=self.spec.step)

    def plan(self, context: RoundContext) -> tuple[Ask, ...]:
        asks: list[Ask] = []
        for metric in self.spec.metrics:
            canary = self._render(metric, context, context.canary, context.stable)
            stable = self._render(metric, context, context.stable, context.canary)
            if canary == stable:
                raise TemplateError(f"judge metric {metric.name!r}: canary and stable render the same query; "
                                    "select the version with {{ canary }} or {{ canary_version }}")
            asks.extend((canary, stable))
        return tuple(asks)

    def judge(self, context: RoundContext, answers: Sequence[Answer],
              canary_requests: float | None) -> tuple[CheckResult, ...]:
        error = _error(answers)
        if error is not None:
            return self.unanswered(str(error))
        plan = self.plan(context)
        config = judge_config(self.spec)
        known = {metric.name for metric in self.spec.metrics}
        state = judging.JudgeState(tuple((name, why) for name, why in context.judge_failed if name in known))
        samples = {metric.name: judging.MetricSamples(_samples(answers[2 * i]), _samples(answers[2 * i + 1]))
                   for i, metric in enumerate(self.spec.metrics)}
        verdict, _ = judging.judge(state, samples, config)
        results: list[CheckResult] = []
        for i, (metric, judged) in enumerate(zip(self.spec.metrics, verdict.metrics, strict=True)):
            stats = judged.stats
            results.append(CheckResult(
                metric.name, judged.outcome, _median(samples[metric.name].canary),
                _median(samples[metric.name].stable), Thresholds(), judged.reason, self.kind,
                (plan[2 * i].query, plan[2 * i + 1].query), judged.canary_samples, judged.stable_samples,
                stats.estimate if stats else None, stats.interval if stats else None, judged.rule.value,
                counted=False))
        short = [judged for judged in verdict.metrics if judged.rule is judging.Rule.MIN_SAMPLES]
        undecided = [judged for judged in verdict.metrics if judged.outcome is CheckOutcome.INCONCLUSIVE]
        rule = None
        reason = verdict.reason
        if verdict.outcome is CheckOutcome.INCONCLUSIVE and short and len(short) == len(undecided):
            rule = GATHERING
            needs = ", ".join(
                f"{judged.name} {min(judged.canary_samples, judged.stable_samples)}/"
                f"{_minimum(self.spec, judged.name)}" for judged in short)
            reason = f"waiting for samples: {needs} (canary/stable, the fewer); {verdict.reason}"
        score = verdict.score
        results.append(CheckResult(
            JUDGE_VERDICT, verdict.outcome, score if score is not None else verdict.score_low, None, Thresholds(),
            reason, self.kind, (), sum(v.canary_samples for v in verdict.metrics),
            sum(v.stable_samples for v in verdict.metrics), rule=rule))
        return tuple(results)

    def unanswered(self, reason: str) -> tuple[CheckResult, ...]:
        metrics = tuple(CheckResult(metric.name, CheckOutcome.INCONCLUSIVE, None, None, Thresholds(), reason,
                                    self.kind, counted=False) for metric in self.spec.metrics)
        return (*metrics, CheckResult(JUDGE_VERDICT, CheckOutcome.INCONCLUSIVE, None, None, Thresholds(), reason,
                                      self.kind))


def _minimum(spec: JudgeSpec, name: str) -> int:
    metric = next(metric for metric in spec.metrics if metric.name == name)
    return metric.min_samples if metric.min_samples is not None else spec.min_samples
