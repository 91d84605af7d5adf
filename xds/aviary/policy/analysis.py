"""The one threshold evaluator, and the counters that turn check rounds into decisions.

A *check* is one metric of ``analysis.metrics`` evaluated once; a *round* is every metric of the
analysis evaluated together (what ``run_checks`` returns). Each check ends in one of three outcomes:

- ``PASS``: there was enough data and every threshold held;
- ``FAIL``: there was enough data and a threshold was broken;
- ``INCONCLUSIVE``: no answer to judge by: no data, NaN, fewer than ``minRequests`` canary requests,
  or Prometheus unreachable / answering with an error. Inconclusive is never a pass.

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

from aviary.policy.schema import Analysis, MetricCheck

__all__ = [
    "CheckOutcome",
    "CheckResult",
    "Counters",
    "Thresholds",
    "failure_limit_reason",
    "inconclusive",
    "inconclusive_limit_reason",
    "judge",
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

    @classmethod
    def of(cls, check: MetricCheck) -> Thresholds:
        return cls(check.min, check.max, check.max_decrease_from_stable)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One metric judged once. ``value``/``stable_value`` are what Prometheus answered (None = no data)."""

    name: str
    outcome: CheckOutcome
    value: float | None
    stable_value: float | None
    thresholds: Thresholds
    reason: str

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
    return CheckResult(check.name, CheckOutcome.INCONCLUSIVE, value, stable_value, thresholds, reason)


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


def round_outcome(results: Iterable[CheckResult]) -> CheckOutcome:
    """The outcome of a round: the worst of its checks (an empty round is inconclusive)."""
    return worst(result.outcome for result in results)


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
