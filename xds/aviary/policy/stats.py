"""The few scipy functions Aviary uses, behind typed signatures (scipy ships no type information).

Kept narrow on purpose: the rest of the package sees floats and callables, never scipy objects.
"""

from __future__ import annotations

from collections.abc import Callable

from scipy import optimize, special

__all__ = ["log_normal_cdf", "root"]


def log_normal_cdf(x: float) -> float:
    """log Phi(x), accurate far in the lower tail (where Phi underflows)."""
    return float(special.log_ndtr(x))


def root(function: Callable[[float], float], low: float, high: float) -> float:
    """A zero of ``function`` in [low, high], where it changes sign (Brent's method)."""
    return float(optimize.brentq(function, low, high, xtol=1e-12))
