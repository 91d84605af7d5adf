"""The seam between check rounds and a metrics backend.

Exceptions::

    MetricProviderError        the backend could not answer: unreachable, timed out, HTTP error
    └── MetricQueryError       it answered, but not with what was asked (several series, a string)

Both make a check INCONCLUSIVE (never a pass, never a failure); backends translate their own
errors into these at the boundary (``raise MetricProviderError(...) from exc``), keeping the
backend's own message (Prometheus' ``error`` text, the web service's HTTP status).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MetricProvider", "MetricProviderError", "MetricQueryError"]


class MetricProviderError(Exception):
    """The metrics backend is unreachable or answered with an error."""


class MetricQueryError(MetricProviderError):
    """The backend answered, but the answer is not what was asked for (one number, one series)."""


class MetricProvider(Protocol):
    """Evaluates a rendered query to one number (``query_scalar``, an instant query) or to a
    series of samples (``query_series``, what a statistical check compares).

    ``query_scalar`` returns None when the query matched nothing (no data), the value otherwise,
    NaN included (``0/0``, a histogram without samples): the check kinds turn both into
    INCONCLUSIVE. Both raise ``MetricProviderError`` when the backend cannot answer; never
    anything else.

    ``query`` is what the check rendered: PromQL for Prometheus, ``URL#JSONPATH`` for the web
    provider. ``timeout`` (seconds, derived from the analysis' ``checkEvery``) is how long the
    caller waits: a provider gives up by then (a shorter limit of its own may apply) and names the
    timeout in its error, and must not let abandoned queries pile up (threads, connections) while
    the backend hangs. ``repr(provider)`` names the backend in messages.

    ``query_series`` evaluates ``query`` over the last ``window`` seconds at one sample every
    ``step`` seconds (a Prometheus range query at the scrape interval) and returns the samples in
    time order, NaN included; an empty tuple when nothing matched. The query must select one
    series (aggregate it), else ``MetricQueryError``. Same timeout and error contract as
    ``query_scalar``.
    """

    async def query_scalar(self, query: str, timeout: float) -> float | None: ...

    async def query_series(self, query: str, window: float, step: float, timeout: float) -> tuple[float, ...]: ...
