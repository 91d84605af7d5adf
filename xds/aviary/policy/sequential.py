"""The anytime-valid statistics under the judge (``aviary.policy.judge``): pure numbers, no policy.

Three pieces:

- ``RankComparison``: the two-sample Mann-Whitney U statistic of canary against stable after
  shifting the canary by ``a`` (``z(a)``, ties counted half, tie-corrected variance), and its
  inversion into the Hodges-Lehmann shift estimate and interval bounds. Everything is computed
  on sorted arrays with binary search, O((n + m) log(n + m)) per evaluation, never on the n x m
  matrix of pairwise differences, so cumulative series of thousands of samples stay cheap.
- ``horizon_boundary(n, m, alpha, horizon)``: the critical value for ``z`` that keeps the chance of
  crossing it at any look up to a planned ``horizon`` (samples per side) at or below ``alpha``;
  the judge's method whenever the horizon is known (``JudgeConfig.horizon``).
- ``boundary(n, m, alpha, tuned_for)``: the critical value for ``z`` that keeps the chance of
  *ever* crossing it, however often and however long one looks, at or below ``alpha`` (a normal
  mixture); the judge's method when no horizon is given.

Why a mixture boundary on the rank statistic. The judge is consulted every ``checkEvery`` on the
samples gathered so far; a fixed-horizon test repeated at each look crosses its 1.645 one-sided
critical value by chance far more often than 5 % (the "peeking" problem). Under "canary and stable
are alike", the Mann-Whitney statistic, written as a score process ``S = z * sqrt(I)`` over the
information ``I = n m / (n + m)``, has asymptotically independent increments: it is, to first order
(its Hajek projection), a difference of two sums of i.i.d. uniform ranks, hence approximately
Brownian motion in ``I`` (the standard basis of group-sequential rank tests; Jennison & Turnbull,
"Group Sequential Methods with Applications to Clinical Trials", 2000). For a process like that,
Robbins' normal-mixture martingale gives a boundary that holds uniformly over time (Robbins, 1970,
"Statistical methods related to the law of the iterated logarithm"; in the confidence-sequence form
of Howard, Ramdas, McAuliffe & Sekhon, 2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", Annals of Statistics). Using it on a statistic that is only asymptotically Gaussian is
what Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas call an asymptotic confidence sequence
("Time-uniform central limit theory and asymptotic confidence sequences", Annals of Statistics,
2024). The false-alarm rate is therefore asymptotic, not exact; ``tests/bench/judge_simulation.py``
measures it with checks every round and small samples. Small-sample rank statistics have lighter
tails than the normal, which errs on the safe side.

The one-sided mixture (a half-normal mixing density over positive drifts only; Howard et al. 2021,
one-sided normal mixture) is used because the judge only rolls back in the metric's bad direction:
with mixing precision ``rho`` the martingale is
``M = 2 sqrt(rho / (I + rho)) exp(S^2 / (2 (I + rho))) Phi(S / sqrt(I + rho))`` and Ville's
inequality gives ``P(exists t: M_t >= 1/alpha) <= alpha``. ``rho`` sets where the boundary is
tightest; it is tuned for ``tuned_for`` samples per side with Howard et al.'s rule
``rho = I* / (2 log(1/alpha) + log(1 + 2 log(1/alpha)))``.

Why a horizon boundary when the horizon is known. The mixture pays for holding at every sample
count up to infinity: it needs about twice the samples of a fixed-horizon test for the same power
(``tests/bench/judge_results.json``). A canary has a planned length, though, so the judge knows
the most samples per side it will see, the horizon ``N`` (information ``I_max = N / 2``). For
Brownian motion ``S`` the reflection principle gives, for continuous monitoring,
``P(sup_{I <= I_max} S(I) >= c sqrt(I_max)) = 2 (1 - Phi(c))``, and less for looks at discrete
times. Rejecting when ``S >= c sqrt(I_max)``, i.e. ``z >= c sqrt(I_max / I)``, with
``c = Phi^-1(1 - alpha / 2)`` therefore keeps the one-sided error at or below ``alpha`` for any
number and timing of looks before the horizon. This is the continuous-monitoring limit of the
O'Brien-Fleming boundary (O'Brien & Fleming, 1979, "A multiple testing procedure for clinical
trials", Biometrics), and the boundary that Lan & DeMets' O'Brien-Fleming-type spending function
``alpha(t) = 2 - 2 Phi(z_{alpha/2} / sqrt(t))`` spends (Lan & DeMets, 1983, "Discrete sequential
boundaries for clinical trials", Biometrika; Jennison & Turnbull, 2000, chapter 7). It is strict
early (``z`` of ``c sqrt(N / n)``) and reaches ``c`` (1.96 at 5 %) at the horizon; with the horizon
at the sample size of an 80 %-power fixed test it still has about 78 % power under continuous
monitoring (73 % measured with a look every 10 samples; 80 % with a horizon 1.25 x that size).
The bound says nothing about looks past ``I_max``: the judge then judges the first ``N`` samples
of each side only, i.e. repeats the look at the horizon (see ``aviary.policy.judge``).

Why Mann-Whitney with Hodges-Lehmann. Latency and error-rate series are skewed and full of ties
(zeros); a rank test assumes no distribution, the Hodges-Lehmann shift (median of the pairwise
differences canary - stable) is its matching estimate, and inverting the test gives its interval,
as Kayenta does with a fixed-horizon test. Here the inversion uses the anytime boundary instead of a
fixed quantile, which makes the interval a confidence sequence.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from aviary.policy import stats

__all__ = ["RankComparison", "boundary", "horizon_boundary", "mixture_precision"]

FloatArray = npt.NDArray[np.float64]

_BISECTIONS = 60  # value bisection steps: enough to pin a crossing to ~1e-18 of the data's span


def mixture_precision(tuned_for: int, alpha: float) -> float:
    """``rho`` that makes the boundary tightest at ``tuned_for`` samples on each side (I* = n/2)."""
    info = max(tuned_for, 1) / 2.0
    log_inv = math.log(1.0 / alpha)
    return info / (2.0 * log_inv + math.log(1.0 + 2.0 * log_inv))


def horizon_boundary(n: int, m: int, alpha: float, horizon: int) -> float:
    """One-sided critical value for ``z`` after ``n`` canary and ``m`` stable samples, for a test
    planned to end at ``horizon`` samples per side: ``Phi^-1(1 - alpha / 2) sqrt(I_max / I)``.

    ``P(exists look with I <= I_max: z >= boundary) <= alpha`` under "alike" (reflection principle,
    see the module docstring). Past the horizon (``I > I_max``) the bound does not hold; the value
    returned there is ``c`` (never below it), and callers keep their samples within the horizon.
    """
    if n <= 0 or m <= 0:
        return math.inf
    if not 0.0 < alpha < 1.0 or horizon < 1:
        raise ValueError(f"horizon_boundary: need 0 < alpha < 1 and horizon >= 1, not {alpha}, {horizon}")
    info = n * m / (n + m)
    info_max = horizon / 2.0
    c = statistics.NormalDist().inv_cdf(1.0 - alpha / 2.0)
    return c * math.sqrt(max(info_max / info, 1.0))


@lru_cache(maxsize=4096)
def boundary(n: int, m: int, alpha: float, tuned_for: int = 50) -> float:
    """One-sided critical value for ``z`` after ``n`` canary and ``m`` stable samples.

    The smallest ``c`` with ``P(exists look: z >= c) <= alpha`` under "alike" (see the module
    docstring). It grows slowly with the samples (like sqrt(log I)), unlike a fixed 1.645.
    """
    if n <= 0 or m <= 0:
        return math.inf
    info = n * m / (n + m)
    rho = mixture_precision(tuned_for, alpha)
    # log M as a function of u = S / sqrt(I + rho); increasing in u.
    constant = math.log(2.0) + 0.5 * math.log(rho / (info + rho)) - math.log(1.0 / alpha)

    def log_m(u: float) -> float:
        return constant + u * u / 2.0 + stats.log_normal_cdf(u)

    high = 1.0
    while log_m(high) < 0.0:
        high *= 2.0
    u = stats.root(log_m, 0.0 if log_m(0.0) < 0.0 else -50.0, high)
    return u * math.sqrt(info + rho) / math.sqrt(info)


def _tie_term(counts: npt.NDArray[np.int64]) -> float:
    c = counts.astype(np.float64)
    return float(np.sum(c * c * c - c))


@dataclass(frozen=True, slots=True)
class RankComparison:
    """Canary ``x`` against stable ``y``: finite samples only, each sorted ascending."""

    x: FloatArray
    y: FloatArray

    @classmethod
    def of(cls, canary: FloatArray, stable: FloatArray) -> RankComparison:
        return cls(np.sort(np.asarray(canary, dtype=np.float64)), np.sort(np.asarray(stable, dtype=np.float64)))

    @property
    def n(self) -> int:
        return int(self.x.size)

    @property
    def m(self) -> int:
        return int(self.y.size)

    def u(self, shifts: FloatArray) -> FloatArray:
        """U(a) for each shift a: pairs with x - a > y, ties counted half."""
        shifted = self.x[None, :] - shifts[:, None]
        below = np.searchsorted(self.y, shifted, side="left")
        at_or_below = np.searchsorted(self.y, shifted, side="right")
        return np.asarray((below + at_or_below).sum(axis=1) / 2.0, dtype=np.float64)

    def z(self, shift: float) -> float:
        """Standardized Mann-Whitney statistic of ``x - shift`` against ``y`` (tie-corrected).

        Positive when the canary is larger than the stable plus ``shift``. All-tied samples give 0.
        """
        n, m = self.n, self.m
        u = float(self.u(np.array([shift]))[0])
        values_x, counts_x = np.unique(self.x, return_counts=True)
        values_y, counts_y = np.unique(self.y, return_counts=True)
        # A group of equal canary values may meet a group of equal stable values once shifted.
        shifted = values_x - shift
        lo = np.searchsorted(values_y, shifted, side="left")
        hi = np.searchsorted(values_y, shifted, side="right")
        met = np.where(hi > lo, counts_y[np.minimum(lo, values_y.size - 1)], 0)
        ties = _tie_term(counts_x) + _tie_term(counts_y)
        ties += _tie_term(counts_x + met) - _tie_term(counts_x) - _tie_term(met)
        total = n + m
        variance = n * m / 12.0 * ((total + 1) - ties / (total * (total - 1)))
        if variance <= 0.0:
            return 0.0
        return (u - n * m / 2.0) / math.sqrt(variance)

    def shifts_at(self, targets: FloatArray) -> FloatArray:
        """For each target t, the shift where U(a) falls below t: the pairwise difference x_i - y_j
        at which the step function U crosses t (sup of the shifts with U >= t).

        U is non-increasing in a, from n m (far left) to 0 (far right); a target above n m has no
        such shift (-inf), one at or below 0 has none either (+inf). Bisection on the value keeps
        U(lo) >= t > U(hi) and stops once one pair (or one group of tied pairs) is left between.
        """
        n, m = self.n, self.m
        span = float(self.x[-1] - self.x[0] + self.y[-1] - self.y[0])
        pad = max(span, abs(float(self.x[-1])), abs(float(self.y[-1])), 1.0)
        lo = np.full(targets.size, float(self.x[0] - self.y[-1]) - pad)
        hi = np.full(targets.size, float(self.x[-1] - self.y[0]) + pad)
        u_lo = np.full(targets.size, float(n * m))
        u_hi = np.zeros(targets.size)
        for _ in range(_BISECTIONS):
            done = (u_lo - u_hi <= 1.0) | (hi - lo <= 1e-12 * pad)
            if np.all(done):
                break
            mid = np.where(done, lo, (lo + hi) / 2.0)
            u_mid = self.u(mid)
            above = (u_mid >= targets) & ~done
            below = (u_mid < targets) & ~done
            lo, u_lo = np.where(above, mid, lo), np.where(above, u_mid, u_lo)
            hi, u_hi = np.where(below, mid, hi), np.where(below, u_mid, u_hi)
        # Bisection may have landed on a difference itself: the crossing is there if U drops below t
        # just after it (U counts a tied pair half at the difference, none after it).
        shifted = self.x[None, :] - lo[:, None]
        tied = (np.searchsorted(self.y, shifted, side="right") - np.searchsorted(self.y, shifted, side="left")).sum(1)
        out = np.where((tied > 0) & (u_lo - tied / 2.0 < targets), lo, self._next_difference(lo))
        out[targets > n * m] = -math.inf
        out[targets <= 0] = math.inf
        return out

    def _next_difference(self, values: FloatArray) -> FloatArray:
        """The smallest pairwise difference x_i - y_j above each value (as U's comparisons see it)."""
        at = np.searchsorted(self.y, self.x[None, :] - values[:, None], side="left") - 1  # largest y < x - v
        differences = np.where(at >= 0, self.x[None, :] - self.y[np.maximum(at, 0)], math.inf)
        return np.asarray(differences.min(axis=1), dtype=np.float64)

    def estimate_and_interval(self, critical: float) -> tuple[float, float, float]:
        """Hodges-Lehmann shift (canary - stable) and the interval of shifts ``z`` cannot reject at
        ``critical`` on either side: (estimate, lower, upper).

        The interval uses the variance without the shift-dependent tie term, so at tied data it is
        an approximation for display; the verdict itself is ``z`` at the allowed effect.
        """
        n, m = self.n, self.m
        half = n * m / 2.0
        _, counts_x = np.unique(self.x, return_counts=True)
        _, counts_y = np.unique(self.y, return_counts=True)
        total = n + m
        ties = _tie_term(counts_x) + _tie_term(counts_y)
        sd = math.sqrt(max(n * m / 12.0 * ((total + 1) - ties / (total * (total - 1))), 0.0))
        spread = critical * sd if math.isfinite(critical) else math.inf
        targets = np.array([half, half + spread, half - spread])
        estimate, lower, upper = (float(v) for v in self.shifts_at(targets))
        return estimate, lower, upper
