"""The seam between check rounds and a metrics backend.

Exceptions::

    MetricProviderError        the backend could not answer: unreachable, timed out, HTTP error
    └── MetricQueryError       it answered, but not with one number (several series, a string)

Both make a check INCONCLUSIVE (never a pass, never a failure); backends translate their own
errors into these at the boundary (``raise MetricProviderError(...) from exc``).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MetricProvider", "MetricProviderError", "MetricQueryError"]


class MetricProviderError(Exception):
    """The metrics backend is unreachable or answered with an error."""


class MetricQueryError(MetricProviderError):
    """The backend answered, but the answer is not a single number."""


class MetricProvider(Protocol):
    """Evaluates an instant query to one number.

    Returns None when the query matched no series (no data), the value otherwise, NaN included
    (``0/0``, a histogram without samples): the judge turns both into INCONCLUSIVE. Raises
    ``MetricProviderError`` when the backend cannot answer; never anything else.

    ``timeout`` (seconds, derived from the analysis' ``checkEvery``) is how long the caller waits:
    a provider gives up by then (a shorter limit of its own may apply) and names the timeout in its
    error, and must not let abandoned queries pile up (threads, connections) while the backend hangs.
    ``repr(provider)`` names the backend in messages.
    """

    async def query_scalar(self, promql: str, timeout: float) -> float | None: ...
