"""Check kinds: each plans the queries it needs and judges their answers into results.

A check round (``aviary.metrics.checks``) is kind-agnostic: it asks every kind for its plan (a
tuple of ``Ask``), runs the distinct asks at once against the providers, and hands each kind its
answers, in the order it planned them. So a new kind is one class with three methods
(``Check``), constructed from its policy block and listed by ``checks_of``:

- ``ThresholdCheck`` (``kind: threshold``): the canary's value against ``min``/``max``, plus
  today's ``maxDecreaseFromStable``; judged by ``aviary.policy.analysis.judge``.
- ``CompareCheck`` (``kind: compare``): the same query for canary and stable over the same window,
  bounded by ratio or difference; judged by ``aviary.policy.analysis.judge_compare``.

A statistical kind plans series asks (``Ask.window``/``Ask.step`` set: a range query at the
scrape step) for canary and stable per metric, and reports sample counts in its results.
Verdicts stay pure functions in ``aviary.policy``; this module only wires them to queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aviary.metrics.provider import MetricProviderError
from aviary.metrics.templates import Side, TemplateError, render
from aviary.policy.analysis import CheckResult, inconclusive, judge, judge_compare
from aviary.policy.schema import Analysis, MetricCheck

__all__ = [
    "PROMETHEUS",
    "WEB",
    "Answer",
    "Ask",
    "Check",
    "CompareCheck",
    "RoundContext",
    "ThresholdCheck",
    "check_of",
    "checks_of",
]

PROMETHEUS = "prometheus"
WEB = "web"


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


def _source(metric: MetricCheck) -> str:
    return WEB if metric.web is not None else PROMETHEUS


def _render(metric: MetricCheck, context: RoundContext, measured: Side, other: Side) -> Ask:
    query = render(metric, measured, other, context.analysis.window, context.analysis.version_label)
    return Ask(_source(metric), query)


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
        queries = tuple(ask.query for ask in self.plan(context))
        error = _error(answers)
        if error is not None:
            result = inconclusive(self.metric, str(error))
        else:
            stable = _scalar(answers[1]) if len(answers) > 1 else None
            result = judge(self.metric, _scalar(answers[0]), stable, canary_requests, context.analysis.min_requests)
        return (dataclasses.replace(result, queries=queries),)

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
        queries = tuple(ask.query for ask in self.plan(context))
        error = _error(answers)
        if error is not None:
            result = inconclusive(self.metric, str(error))
        else:
            result = judge_compare(self.metric, _scalar(answers[0]), _scalar(answers[1]), canary_requests,
                                   context.analysis.min_requests)
        return (dataclasses.replace(result, queries=queries),)

    def unanswered(self, reason: str) -> tuple[CheckResult, ...]:
        return (inconclusive(self.metric, reason),)


def check_of(metric: MetricCheck) -> Check:
    """The check of one ``analysis.metrics`` entry, by its kind."""
    return CompareCheck(metric) if metric.compare is not None else ThresholdCheck(metric)


def checks_of(analysis: Analysis) -> tuple[Check, ...]:
    """Every check a round of ``analysis`` runs, in policy order (a ``judge`` block goes here too)."""
    return tuple(check_of(metric) for metric in analysis.metrics)
