"""The statistical judge: canary against stable samples, metric by metric, with a sequential test.

Pure: samples and a config in, a verdict with reasons out, no I/O and no clock. The caller (the
check pipeline) fetches each metric's samples for canary and stable over the same window and calls

    verdict, state = judge(state, samples, config)

at every ``checkEvery``, with the samples *gathered since the canary started* (cumulative, not just
this round's, in time order), and keeps ``state`` (a small frozen value: the metrics that have
already failed) for the next round. A new canary run starts from ``JudgeState()``.

Per metric (``judge_metric``):

1. Non-finite values (NaN, inf) are dropped and counted. No samples left on a side: INCONCLUSIVE
   (``no-data``), or FAIL with ``mustHaveData``. Fewer than ``minSamples`` valid samples on a side:
   INCONCLUSIVE (``min-samples``), never a pass.
2. With a ``horizon`` (samples per side the canary is planned to last; ``JudgeCheck`` derives it
   from the strategy), only the first ``horizon`` samples of each side are judged: the test ends at
   the horizon, and later rounds repeat its last look rather than add new ones.
3. The Mann-Whitney statistic ``z`` of ``canary - allowed`` against stable is compared with the
   boundary of ``aviary.policy.sequential`` (its docstring says why): the horizon boundary
   (continuous O'Brien-Fleming) when ``horizon`` is set, the normal-mixture boundary (valid for
   ever, slower to decide) when it is not. ``allowed`` is absolute, or relative to the stable median
   (``10%``). Crossing it in the metric's bad ``direction`` classifies the metric
   ``higher``/``lower`` and FAILs it (``beyond-allowed``); otherwise it PASSes (``no-evidence``) as
   ``same`` or as the harmless direction. The Hodges-Lehmann shift and its interval (the shifts the
   same boundary cannot reject) are reported with it.
4. A metric that failed once stays failed for the rest of the run (``failed-earlier``): a
   sequential test is a stopping rule, its guarantee is about the first crossing.

The round: a FAILed ``critical`` metric fails it. Otherwise the score is the weighted share of
passing metrics; inconclusive metrics make it a range (they may yet pass or fail). The round PASSes
when even the low end reaches ``pass``, FAILs when even the high end stays below ``marginal``, and
is INCONCLUSIVE otherwise (a marginal score, or an answer that hangs on inconclusive metrics).

False alarms: ``alpha`` (default 5 %) bounds the chance that an unchanged canary ever fails a round
during its whole run, however many rounds: each metric is tested at ``alpha / len(metrics)``
(Bonferroni), one-sided in its bad direction (``either``: half on each side). That holds for samples
cumulated over the whole run; restarting the samples and the state at every step would spend
``alpha`` once per step. With the horizon boundary and a horizon of 1.25 x the samples a single
fixed-horizon test needs for 80 % power, 80 % of canaries 30 % slower are caught by the horizon
(median: 0.8 x it), at 0.6 x the mixture's samples; a fixed 5 % test repeated every round would
instead roll back about one unchanged canary in four (``tests/bench/judge_simulation.py`` measures
all three, ``tests/bench/judge_results.json`` has the figures).

Past the horizon: a metric that has not crossed by its ``horizon`` samples per side stays ``same``
(PASS) for the rest of the run; the test is over and newer samples do not reopen it. A canary that
runs longer than planned (a manual pause) gains no power from the extra samples; set
``analysis.judge.horizon`` to plan for it. The guarantee also assumes the samples reach back to the
canary's start: once the canary is older than ``maxWindow`` the oldest samples drop out and "the
first ``horizon``" slide with it, so each later round is a new look that neither bound covers (nor
the mixture's). ``JudgeCheck`` caps the horizon at ``maxWindow / step`` so that the test reaches
its horizon before that happens.

A relative ``allowed`` is resolved against the median of the stable samples judged, so it moves a
little from round to round; with ``allowed: 0`` (the default) the test is exactly "canary vs stable".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aviary.policy.analysis import CheckOutcome
from aviary.policy.sequential import RankComparison, boundary, horizon_boundary

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_TUNED_FOR",
    "Allowed",
    "Classification",
    "Direction",
    "JudgeConfig",
    "JudgeMetric",
    "JudgeState",
    "JudgeVerdict",
    "MetricSamples",
    "MetricStats",
    "MetricVerdict",
    "Rule",
    "judge",
    "judge_metric",
]

DEFAULT_ALPHA = 0.05
"""Chance that an unchanged canary is ever failed during its run, all metrics and rounds together."""
DEFAULT_MIN_SAMPLES = 20
"""Valid samples needed on each side before a metric is judged: below, rank tests have no power
and the normal approximation of the boundary is at its weakest."""
DEFAULT_TUNED_FOR = 50
"""Samples per side where the mixture boundary (no horizon) is tightest (it is valid at every count)."""


class Direction(enum.Enum):
    """Which change of the canary against stable is bad."""

    INCREASE = "increase"
    DECREASE = "decrease"
    EITHER = "either"


class Classification(enum.Enum):
    HIGHER = "higher"
    LOWER = "lower"
    SAME = "same"


class Rule(enum.Enum):
    """The rule that produced a metric's outcome (stable identifiers for status output)."""

    NO_DATA = "no-data"
    MUST_HAVE_DATA = "must-have-data"
    MIN_SAMPLES = "min-samples"
    BEYOND_ALLOWED = "beyond-allowed"
    NO_EVIDENCE = "no-evidence"
    FAILED_EARLIER = "failed-earlier"


@dataclass(frozen=True, slots=True)
class Allowed:
    """The change tolerated before a metric counts as changed: ``value`` in the metric's unit, or
    ``value`` x |stable median| when ``relative`` (``Allowed.parse("10%")``)."""

    value: float = 0.0
    relative: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"allowed must be a finite number >= 0, not {self.value!r}")

    @classmethod
    def parse(cls, text: str | float) -> Allowed:
        """``"10%"`` (relative to the stable median), ``"2.5"`` or ``2.5`` (absolute)."""
        if isinstance(text, str) and text.strip().endswith("%"):
            return cls(float(text.strip()[:-1]) / 100.0, relative=True)
        return cls(float(text))

    def absolute(self, stable_median: float) -> float:
        return self.value * abs(stable_median) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass(frozen=True, slots=True)
class JudgeMetric:
    """One metric of ``analysis.judge.metrics`` (where its samples come from is the caller's business)."""

    name: str
    direction: Direction = Direction.INCREASE
    allowed: Allowed = field(default_factory=Allowed)
    critical: bool = False
    must_have_data: bool = False
    weight: float = 1.0
    min_samples: int | None = None
    """None: the judge's ``min_samples``."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"{self.name}: weight must be > 0, not {self.weight!r}")
        if self.min_samples is not None and self.min_samples < 2:
            raise ValueError(f"{self.name}: minSamples must be >= 2, not {self.min_samples}")


@dataclass(frozen=True, slots=True)
class JudgeConfig:
    """``analysis.judge``: its metrics and the score bands (percent)."""

    metrics: tuple[JudgeMetric, ...]
    pass_score: float = 95.0
    marginal_score: float = 75.0
    alpha: float = DEFAULT_ALPHA
    min_samples: int = DEFAULT_MIN_SAMPLES
    tuned_for: int = DEFAULT_TUNED_FOR
    horizon: int | None = None
    """Samples per side the test is planned for (horizon boundary); None: the mixture boundary."""

    def __post_init__(self) -> None:
        names = [metric.name for metric in self.metrics]
        if not names:
            raise ValueError("judge: at least one metric")
        if len(set(names)) != len(names):
            raise ValueError(f"judge: metric names must be unique: {names}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"judge: alpha must be in (0, 1), not {self.alpha}")
        if not 0.0 <= self.marginal_score <= self.pass_score <= 100.0:
            raise ValueError(f"judge: need 0 <= marginal ({self.marginal_score}) <= pass ({self.pass_score}) <= 100")
        if self.min_samples < 2 or self.tuned_for < 2:
            raise ValueError("judge: minSamples and tunedFor must be >= 2")
        if self.horizon is not None and self.horizon < 2:
            raise ValueError(f"judge: horizon must be >= 2 samples per side, not {self.horizon}")

    @property
    def metric_alpha(self) -> float:
        """Each metric's share of ``alpha`` (Bonferroni)."""
        return self.alpha / len(self.metrics)


@dataclass(frozen=True, slots=True)
class MetricSamples:
    """One metric's samples over the same window (cumulative since the canary started)."""

    canary: Sequence[float]
    stable: Sequence[float]


@dataclass(frozen=True, slots=True)
class JudgeState:
    """What the judge remembers between rounds: metrics that have failed, with the reason then."""

    failed: tuple[tuple[str, str], ...] = ()

    def reason_failed(self, name: str) -> str | None:
        return next((reason for failed, reason in self.failed if failed == name), None)

    def with_failed(self, name: str, reason: str) -> JudgeState:
        if self.reason_failed(name) is not None:
            return self
        return JudgeState((*self.failed, (name, reason)))


@dataclass(frozen=True, slots=True)
class MetricStats:
    """The numbers behind a judged metric (absent when it had too little data to be judged)."""

    classification: Classification
    estimate: float
    """Hodges-Lehmann shift, canary - stable, in the metric's unit."""
    interval: tuple[float, float]
    """The shifts the same boundary cannot reject (+-inf when wide open)."""
    stable_median: float
    allowed: float
    """The allowed change in the metric's unit (``Allowed`` resolved against the stable median)."""
    z: float
    """Mann-Whitney z at the allowed change, on the bad side (the larger one for ``either``)."""
    boundary: float
    alpha: float
    """The one-sided level of this metric's test (its share of the judge's ``alpha``)."""


@dataclass(frozen=True, slots=True)
class MetricVerdict:
    """One metric judged once, with every number its reason quotes."""

    name: str
    outcome: CheckOutcome
    rule: Rule
    reason: str
    canary_samples: int
    stable_samples: int
    dropped: int
    """Non-finite values dropped, both sides together."""
    critical: bool
    weight: float
    stats: MetricStats | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.outcome.value} [{self.rule.value}]: {self.reason}"


@dataclass(frozen=True, slots=True)
class JudgeVerdict:
    """A round: its outcome, the score range (percent) and every metric's verdict."""

    outcome: CheckOutcome
    reason: str
    score_low: float
    score_high: float
    metrics: tuple[MetricVerdict, ...]

    @property
    def score(self) -> float | None:
        """The score, when no inconclusive metric leaves it open."""
        return self.score_low if self.score_low == self.score_high else None

    def __str__(self) -> str:
        return f"{self.outcome.value}: {self.reason}"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:+.4g}"


def _relative(value: float, median: float) -> str:
    if median == 0 or not math.isfinite(value):
        return ""
    return f" ({value / abs(median) * 100:+.3g}%)"


def _finite(values: Sequence[float]) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]


def judge_metric(metric: JudgeMetric, samples: MetricSamples | None, config: JudgeConfig,
                 failed_before: str | None = None) -> MetricVerdict:
    """One metric's verdict; ``failed_before`` is its reason if it failed in an earlier round."""
    canary = _finite(samples.canary if samples else ())
    stable = _finite(samples.stable if samples else ())
    dropped = (len(samples.canary) + len(samples.stable) - canary.size - stable.size) if samples else 0
    counts = f"canary {canary.size} / stable {stable.size} samples"
    counts += f", {dropped} non-finite dropped" if dropped else ""

    def verdict(outcome: CheckOutcome, rule: Rule, reason: str, stats: MetricStats | None = None) -> MetricVerdict:
        return MetricVerdict(metric.name, outcome, rule, reason, int(canary.size), int(stable.size), int(dropped),
                             metric.critical, metric.weight, stats)

    if canary.size == 0 or stable.size == 0:
        side = "canary and stable" if canary.size == stable.size == 0 else ("canary" if canary.size == 0 else "stable")
        if metric.must_have_data:
            return verdict(CheckOutcome.FAIL, Rule.MUST_HAVE_DATA, f"no data for {side} and mustHaveData ({counts})")
        if failed_before is not None:
            return verdict(CheckOutcome.FAIL, Rule.FAILED_EARLIER, f"failed in an earlier round: {failed_before}")
        return verdict(CheckOutcome.INCONCLUSIVE, Rule.NO_DATA, f"no data for {side} ({counts})")
    minimum = metric.min_samples if metric.min_samples is not None else config.min_samples
    if failed_before is None and min(canary.size, stable.size) < minimum:
        return verdict(CheckOutcome.INCONCLUSIVE, Rule.MIN_SAMPLES,
                       f"{counts}: fewer than minSamples ({minimum}) on a side")

    alpha = config.metric_alpha / (2 if metric.direction is Direction.EITHER else 1)
    if config.horizon is not None:
        # The test ends at the horizon: later rounds judge the same first samples (its last look).
        if max(canary.size, stable.size) > config.horizon:
            counts += f"; past the horizon: the first {config.horizon} a side judged"
        judged_canary, judged_stable = canary[:config.horizon], stable[:config.horizon]
        critical_z = horizon_boundary(int(judged_canary.size), int(judged_stable.size), alpha, config.horizon)
        method = f"horizon boundary (horizon {config.horizon})"
    else:
        judged_canary, judged_stable = canary, stable
        critical_z = boundary(int(canary.size), int(stable.size), alpha, config.tuned_for)
        method = "anytime boundary"
    ranks = RankComparison.of(judged_canary, judged_stable)
    median = float(np.median(judged_stable))
    allowed = metric.allowed.absolute(median)
    z_up, z_down = ranks.z(allowed), ranks.z(-allowed)
    estimate, lower, upper = ranks.estimate_and_interval(critical_z)
    if z_up >= critical_z:
        classification = Classification.HIGHER
    elif z_down <= -critical_z:
        classification = Classification.LOWER
    else:
        classification = Classification.SAME
    bad = {Direction.INCREASE: classification is Classification.HIGHER,
           Direction.DECREASE: classification is Classification.LOWER,
           Direction.EITHER: classification is not Classification.SAME}[metric.direction]
    z_bad = {Direction.INCREASE: z_up, Direction.DECREASE: -z_down,
             Direction.EITHER: max(z_up, -z_down)}[metric.direction]
    stats = MetricStats(classification, estimate, (lower, upper), median, allowed, z_bad, critical_z, alpha)

    allowed_text = f"{metric.allowed}" + (f" (= {allowed:.4g})" if metric.allowed.relative else "")
    shift = (f"shift {_fmt(estimate)}{_relative(estimate, median)}, interval [{_fmt(lower)}, {_fmt(upper)}]"
             f" ({counts})")
    side = {Direction.INCREASE: "an increase", Direction.DECREASE: "a decrease",
            Direction.EITHER: "a change"}[metric.direction]
    test = f"z = {z_bad:.3g} {'>=' if bad else '<'} {method} {critical_z:.3g} (alpha {alpha:.3g})"
    if bad:
        reason = f"{classification.value}: {side} beyond allowed {allowed_text}: {test}; {shift}"
        return verdict(CheckOutcome.FAIL, Rule.BEYOND_ALLOWED, reason, stats)
    if failed_before is not None:
        reason = f"failed in an earlier round ({failed_before}); now {classification.value}: {shift}"
        return verdict(CheckOutcome.FAIL, Rule.FAILED_EARLIER, reason, stats)
    reason = f"{classification.value}: no evidence of {side} beyond allowed {allowed_text}: {test}; {shift}"
    return verdict(CheckOutcome.PASS, Rule.NO_EVIDENCE, reason, stats)


def _band(score: float, config: JudgeConfig) -> CheckOutcome:
    if score >= config.pass_score:
        return CheckOutcome.PASS
    if score >= config.marginal_score:
        return CheckOutcome.INCONCLUSIVE
    return CheckOutcome.FAIL


def judge(state: JudgeState, samples: Mapping[str, MetricSamples],
          config: JudgeConfig) -> tuple[JudgeVerdict, JudgeState]:
    """Judge one round. ``samples`` maps metric names to their cumulative samples (a missing name
    has no data). Returns the round's verdict and the state to pass to the next round."""
    verdicts = tuple(judge_metric(metric, samples.get(metric.name), config, state.reason_failed(metric.name))
                     for metric in config.metrics)
    for verdict in verdicts:
        if verdict.rule is Rule.BEYOND_ALLOWED:
            state = state.with_failed(verdict.name, verdict.reason)
    total = sum(v.weight for v in verdicts)
    passed = sum(v.weight for v in verdicts if v.outcome is CheckOutcome.PASS)
    open_ = sum(v.weight for v in verdicts if v.outcome is CheckOutcome.INCONCLUSIVE)
    low, high = 100.0 * passed / total, 100.0 * (passed + open_) / total
    score = f"score {low:.3g}" if low == high else f"score {low:.3g}..{high:.3g} (inconclusive metrics)"
    critical = [v.name for v in verdicts if v.critical and v.outcome is CheckOutcome.FAIL]
    if critical:
        outcome, reason = CheckOutcome.FAIL, f"critical metric failed: {', '.join(critical)}; {score}"
    elif _band(high, config) is CheckOutcome.FAIL:
        outcome, reason = CheckOutcome.FAIL, f"{score} < marginal ({config.marginal_score:g})"
    elif _band(low, config) is CheckOutcome.PASS:
        outcome, reason = CheckOutcome.PASS, f"{score} >= pass ({config.pass_score:g})"
    elif low == high:
        outcome = CheckOutcome.INCONCLUSIVE
        reason = f"{score}: marginal (>= {config.marginal_score:g}, < pass {config.pass_score:g})"
    else:
        outcome = CheckOutcome.INCONCLUSIVE
        reason = f"{score}: not decided until the inconclusive metrics are (pass {config.pass_score:g})"
    return JudgeVerdict(outcome, reason, low, high, verdicts), state
