"""The rules that judge check answers (threshold, compare), and the counters that turn check
rounds into decisions.

A *check* is one metric of ``analysis.metrics`` evaluated once (by its kind, see
``aviary.metrics.kinds``: ``judge`` for a threshold check, ``judge_compare`` for a compare
check; ``analysis.judge`` is judged by ``aviary.policy.judge`` and reports one result per judged
metric, shown but not counted, plus its verdict, which counts); a *round* is every metric of the
analysis evaluated together (what ``run_checks`` returns). Each check ends in one of three outcomes:

- ``PASS``: there was enough data and every threshold (or compare bound) held;
- ``FAIL``: there was enough data and a threshold was broken;
- ``INCONCLUSIVE``: no answer to judge by: no data, NaN, fewer than ``minRequests`` canary requests,
  or the provider unreachable / answering with an error. Inconclusive is never a pass.

Outcomes are ordered worst-wins, FAIL > INCONCLUSIVE > PASS (``worst``): a round fails if any check
failed, even when another was inconclusive, so a missing metric can never hide a broken one.

The rollout machine counts rounds, not checks (``Counters.record``):

- ``failed`` counts failing rounds over the whole canary run (reset when a new canary starts or
  on Retry); ``failed > failureLimit`` rolls back.
- ``inconclusive`` counts *consecutive* inconclusive rounds; any conclusive round (pass or fail)
  resets it, and so does Resume. ``inconclusive > inconclusiveLimit`` triggers ``onInconclusive``.
  Consecutive, because a single scrape gap should not end a rollout, while a source that stays
  silent does.
- ``passed`` counts passing rounds over the run, for status output only: a pass never cancels a
  failure.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from aviary.policy.schema import Analysis, Compare, MetricCheck

__all__ = [
    "GATHERING",
    "CheckOutcome",
    "CheckResult",
    "Counters",
    "Thresholds",
    "failure_limit_reason",
    "gathering",
    "inconclusive",
    "inconclusive_limit_reason",
    "judge",
    "judge_compare",
    "round_outcome",
    "worst",
]


class CheckOutcome(enum.Enum):
    PASS = "pass"
    INCONCLUSIVE = "inconclusive"
    FAIL = "fail"

    @property
    def severity(self) -> int:
        """Position in the worst-wins order: PASS (0) < INCONCLUSIVE (1) < FAIL (2)."""
        return _SEVERITY[self]


_SEVERITY = {CheckOutcome.PASS: 0, CheckOutcome.INCONCLUSIVE: 1, CheckOutcome.FAIL: 2}


def worst(outcomes: Iterable[CheckOutcome]) -> CheckOutcome:
    """The worst of ``outcomes``; INCONCLUSIVE for none at all (nothing was judged, so no pass)."""
    return max(outcomes, key=lambda outcome: outcome.severity, default=CheckOutcome.INCONCLUSIVE)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The limits a check was judged against, copied into the result for status output."""

    min: float | None = None
    max: float | None = None
    max_decrease_from_stable: float | None = None
    by: str | None = None
    """For a compare check: "ratio" or "difference", what ``min`` and ``max`` bound."""

    @classmethod
    def of(cls, check: MetricCheck) -> Thresholds:
        if check.compare is not None:
            return cls(check.compare.min, check.compare.max, None, check.compare.by)
        return cls(check.min, check.max, check.max_decrease_from_stable)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One metric judged once. ``value``/``stable_value`` are what the provider answered (None = no data).

    ``kind`` is the check kind that judged it; ``queries`` the rendered queries it asked (canary
    first); ``canary_samples``/``stable_samples`` how many samples a series-based kind compared
    and ``effect``/``effect_interval`` the shift it estimated with its confidence interval (None
    for scalar kinds). ``reason`` is the rule that produced the outcome, in words.
    """

    name: str
    outcome: CheckOutcome
    value: float | None
    stable_value: float | None
    thresholds: Thresholds
    reason: str
    kind: str = "threshold"
    queries: tuple[str, ...] = ()
    canary_samples: int | None = None
    stable_samples: int | None = None
    effect: float | None = None
    effect_interval: tuple[float, float] | None = None
    rule: str | None = None
    """The rule of a kind that names its rules (the judge's ``aviary.policy.judge.Rule`` values)."""
    counted: bool = True
    """False: shown, but not part of the round's outcome (the judge's per-metric results: its
    verdict result, which scores them, is what counts)."""

    def __str__(self) -> str:
        return f"{self.name}: {self.outcome.value}: {self.reason}"


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _missing(value: float | None) -> str | None:
    """Why ``value`` cannot be judged, or None if it can."""
    if value is None:
        return "no data"
    if math.isnan(value):
        return "NaN"
    return None


def inconclusive(check: MetricCheck, reason: str, value: float | None = None,
                 stable_value: float | None = None) -> CheckResult:
    """A result with no verdict, e.g. when Prometheus could not be asked."""
    thresholds = Thresholds.of(check)
    return CheckResult(check.name, CheckOutcome.INCONCLUSIVE, value, stable_value, thresholds, reason, check.kind)


def judge(check: MetricCheck, value: float | None, stable_value: float | None,
          canary_requests: float | None, min_requests: int) -> CheckResult:
    """Judge one metric value against ``check``'s thresholds.

    Order: too little traffic or no value -> INCONCLUSIVE; then every threshold is evaluated and the
    worst outcome wins, so a broken ``min`` fails even when the stable value is missing.
    ``maxDecreaseFromStable`` fails when ``stable_value - value`` exceeds it (same unit as the
    metric, e.g. percentage points of success rate).
    """
    thresholds = Thresholds.of(check)

    def result(outcome: CheckOutcome, reason: str) -> CheckResult:
        return CheckResult(check.name, outcome, value, stable_value, thresholds, reason)

    if min_requests > 0:
        if canary_requests is None or math.isnan(canary_requests):
            return result(CheckOutcome.INCONCLUSIVE, "no request count for the canary")
        if canary_requests < min_requests:
            return result(CheckOutcome.INCONCLUSIVE,
                          f"canary requests ({_fmt(canary_requests)}) < minRequests ({min_requests})")
    missing = _missing(value)
    if missing is not None or value is None:
        return result(CheckOutcome.INCONCLUSIVE, f"value: {missing}")

    failures: list[str] = []
    unknown: list[str] = []
    passes: list[str] = []
    if check.min is not None:
        (failures if value < check.min else passes).append(
            f"{_fmt(value)} {'<' if value < check.min else '>='} min ({_fmt(check.min)})")
    if check.max is not None:
        (failures if value > check.max else passes).append(
            f"{_fmt(value)} {'>' if value > check.max else '<='} max ({_fmt(check.max)})")
    if check.max_decrease_from_stable is not None:
        stable_missing = _missing(stable_value)
        if stable_missing is not None or stable_value is None:
            unknown.append(f"stable value: {stable_missing}")
        else:
            decrease = stable_value - value
            text = (f"decrease from stable {_fmt(stable_value)} is {_fmt(decrease)}"
                    f" {'>' if decrease > check.max_decrease_from_stable else '<='}"
                    f" maxDecreaseFromStable ({_fmt(check.max_decrease_from_stable)})")
            (failures if decrease > check.max_decrease_from_stable else passes).append(text)
    if failures:
        return result(CheckOutcome.FAIL, "; ".join(failures))
    if unknown:
        return result(CheckOutcome.INCONCLUSIVE, "; ".join(unknown))
    return result(CheckOutcome.PASS, "; ".join(passes))


def _too_little_traffic(canary_requests: float | None, min_requests: int) -> str | None:
    if min_requests > 0:
        if canary_requests is None or math.isnan(canary_requests):
            return "no request count for the canary"
        if canary_requests < min_requests:
            return f"canary requests ({_fmt(canary_requests)}) < minRequests ({min_requests})"
    return None


def _bound(text: str, measured: float, compare: Compare) -> tuple[bool, str]:
    """(broken, reason) for ``measured`` against compare's min and max; the broken bound first."""
    if compare.min is not None and measured < compare.min:
        return True, f"{text} < min ({_fmt(compare.min)})"
    if compare.max is not None and measured > compare.max:
        return True, f"{text} > max ({_fmt(compare.max)})"
    held = [f">= min ({_fmt(compare.min)})" if compare.min is not None else "",
            f"<= max ({_fmt(compare.max)})" if compare.max is not None else ""]
    return False, f"{text} {' and '.join(part for part in held if part)}"


def judge_compare(check: MetricCheck, value: float | None, stable_value: float | None,
                  canary_requests: float | None, min_requests: int) -> CheckResult:
    """Judge the canary against stable on the same query: ``compare.by`` ratio or difference.

    Order: too little canary traffic, or either value missing or NaN -> INCONCLUSIVE. Ratio:
    ``canary / stable``, where 0 / 0 reads as 1 (both equal) and x / 0 as +infinity (for x > 0),
    so a canary with errors where stable has none breaks a ``max``. Difference: ``canary - stable``
    in the metric's unit. A value outside ``[min, max]`` fails.
    """
    compare = check.compare
    if compare is None:
        raise ValueError(f"check {check.name!r} is not a compare check")
    thresholds = Thresholds.of(check)

    def result(outcome: CheckOutcome, reason: str) -> CheckResult:
        return CheckResult(check.name, outcome, value, stable_value, thresholds, reason, "compare")

    short = _too_little_traffic(canary_requests, min_requests)
    if short is not None:
        return result(CheckOutcome.INCONCLUSIVE, short)
    missing = _missing(value)
    if missing is not None or value is None:
        return result(CheckOutcome.INCONCLUSIVE, f"value: {missing}")
    stable_missing = _missing(stable_value)
    if stable_missing is not None or stable_value is None:
        return result(CheckOutcome.INCONCLUSIVE, f"stable value: {stable_missing}")
    if compare.by == "ratio":
        if stable_value == 0:
            measured = 1.0 if value == 0 else math.copysign(math.inf, value)
        else:
            measured = value / stable_value
        text = f"canary {_fmt(value)} / stable {_fmt(stable_value)} = {_fmt(measured)}"
    else:
        measured = value - stable_value
        text = f"canary {_fmt(value)} - stable {_fmt(stable_value)} = {_fmt(measured)}"
    broken, reason = _bound(text, measured, compare)
    return result(CheckOutcome.FAIL if broken else CheckOutcome.PASS, reason)


def round_outcome(results: Iterable[CheckResult]) -> CheckOutcome:
    """The outcome of a round: the worst of its counted checks (an empty round is inconclusive)."""
    return worst(result.outcome for result in results if result.counted)


GATHERING = "min-samples"
"""The rule of a judge result still short of samples (``aviary.policy.judge.Rule.MIN_SAMPLES``)."""


def gathering(results: Iterable[CheckResult]) -> bool:
    """True for an inconclusive round whose every counted inconclusive check is only short of
    samples: the canary is being measured, not silent, so the round does not count towards
    ``inconclusiveLimit`` (the step waits for the samples instead)."""
    counted = [result for result in results if result.counted]
    if any(result.outcome is CheckOutcome.FAIL for result in counted):
        return False  # a failed round counts, whatever else is still measuring
    open_ = [result for result in counted if result.outcome is CheckOutcome.INCONCLUSIVE]
    return bool(open_) and all(result.rule == GATHERING for result in open_)


@dataclass(frozen=True, slots=True)
class Counters:
    """Check rounds of the current canary run; see the module docstring for what resets what."""

    passed: int = 0
    failed: int = 0
    inconclusive: int = 0

    def record(self, outcome: CheckOutcome) -> Counters:
        if outcome is CheckOutcome.FAIL:
            return Counters(self.passed, self.failed + 1, 0)
        if outcome is CheckOutcome.INCONCLUSIVE:
            return Counters(self.passed, self.failed, self.inconclusive + 1)
        return Counters(self.passed + 1, self.failed, 0)

    def without_inconclusive(self) -> Counters:
        return Counters(self.passed, self.failed, 0)

    def over_failure_limit(self, analysis: Analysis) -> bool:
        return self.failed > analysis.failure_limit

    def over_inconclusive_limit(self, analysis: Analysis) -> bool:
        return self.inconclusive > analysis.inconclusive_limit


def failure_limit_reason(counters: Counters, analysis: Analysis) -> str:
    return f"failed ({counters.failed}) > failureLimit ({analysis.failure_limit})"


def inconclusive_limit_reason(counters: Counters, analysis: Analysis) -> str:
    return f"inconclusive ({counters.inconclusive}) > inconclusiveLimit ({analysis.inconclusive_limit})"
