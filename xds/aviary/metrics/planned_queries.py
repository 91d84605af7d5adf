"""Every query a policy's checks can ask for one canary against one stable, whatever step it is at.

``aviary record`` fetches these and ``aviary simulate`` checks, before it runs, that the recording
holds them: both derive them from the check kinds' own plans (``Check.plan``), so a query is
recorded exactly as a live round renders it. A query can depend on the step (the weight in
``request-rate-per-weight``) and on the phase (the afterPromotion window drops comparisons): every
weight of the strategy, and the window's checks at 100 %, are planned.
"""

from __future__ import annotations

from dataclasses import dataclass

from aviary.discovery.resources import cluster_name
from aviary.metrics.kinds import PROMETHEUS, Ask, Check, JudgeCheck, RoundContext, checks_of
from aviary.metrics.templates import Side, TemplateError, request_count_query
from aviary.policy.rollout_machine import guard_analysis
from aviary.policy.schema import Analysis, RolloutSpec

__all__ = ["PlannedQuery", "look_back", "planned_queries"]


@dataclass(frozen=True, slots=True)
class PlannedQuery:
    """One query and what asks it (``check error-rate (canary)``), for messages."""

    source: str
    query: str
    uses: tuple[str, ...]


def planned_queries(rollout: str, spec: RolloutSpec, canary: str, stable: str) -> list[PlannedQuery]:
    """The distinct queries of every check round ``spec`` can run for ``canary`` against ``stable``."""
    uses: dict[tuple[str, str], list[str]] = {}
    for analysis, weights in _analyses(spec):
        count = request_count_query(cluster_name(rollout, canary), analysis.window)
        _add(uses, Ask(PROMETHEUS, count), "the canary's request count (minRequests)")
        for weight in weights:
            canary_side = Side(cluster_name(rollout, canary), canary, weight)
            stable_side = Side(cluster_name(rollout, stable), stable, 100 - weight)
            context = RoundContext(analysis, canary_side, stable_side)
            for check in checks_of(analysis):
                try:
                    asks = check.plan(context)
                except TemplateError:
                    continue  # a weight this template cannot render at (0 %): the live round cannot either
                for index, ask in enumerate(asks):  # every kind plans canary, stable, canary, ...
                    _add(uses, ask, f"{_name(check, index)} ({'stable' if index % 2 else 'canary'})")
    return [PlannedQuery(source, query, tuple(dict.fromkeys(names))) for (source, query), names in uses.items()]


def look_back(spec: RolloutSpec) -> float:
    """Seconds before the canary's arrival a range query can reach back: the judge's samples reach
    back to the canary's start, but at least two steps, and ``minSamples`` steps while its start
    is not known (``aviary.metrics.kinds.judge_window``). Instant queries need none: their window
    is inside the PromQL, which Prometheus evaluated when recording."""
    analysis = spec.analysis
    if analysis is None or analysis.judge is None:
        return 0.0
    judge = analysis.judge
    return min(judge.max_window, judge.step * max(2, judge.min_samples))


def _analyses(spec: RolloutSpec) -> list[tuple[Analysis, list[int]]]:
    weights = sorted({*(spec.strategy.weights if spec.strategy else ()), 100})
    found: list[tuple[Analysis, list[int]]] = []
    if spec.analysis is not None:
        found.append((spec.analysis, weights))
    guarded = guard_analysis(spec.analysis)
    if guarded is not None and spec.strategy is not None and spec.strategy.after_promotion is not None:
        found.append((guarded, [100]))
    return found


def _add(uses: dict[tuple[str, str], list[str]], ask: Ask, use: str) -> None:
    uses.setdefault((ask.source, ask.query), []).append(use)


def _name(check: Check, index: int) -> str:
    if isinstance(check, JudgeCheck):
        return f"judge metric {check.spec.metrics[index // 2].name}"
    metric = getattr(check, "metric", None)
    return f"{check.kind} check {metric.name}" if metric is not None else f"{check.kind} check"
