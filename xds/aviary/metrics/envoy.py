"""``MetricProvider`` over what the proxies reported to Aviary itself (``analysis.provider: envoy``).

It answers the built-in Envoy templates from the store (``aviary.metrics.envoy_reports``), with
no query language: the query is an ``EnvoyQuery`` (``aviary.metrics.envoy_query``). Counters are
summed across every proxy that reported in the window; percentiles are exact, over the
access-log samples of the window (Prometheus interpolates inside histogram buckets). The same
rules as the PromQL templates (``aviary.metrics.templates``): no requests give NaN for the
rates and percentiles (inconclusive), a 5xx class that never appeared counts as zero.

A proxy that serves the rollout but does not report (no ``metrics_service`` stat sink in its
bootstrap, or the sink cannot reach Aviary) would make every count too small, so the provider
does not answer: ``MetricProviderError`` naming the proxies, which makes the checks
INCONCLUSIVE with that reason, never a pass. A proxy connected for less than ``REPORT_GRACE``
seconds is not expected to have reported yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from aviary.metrics.envoy_query import REQUEST_COUNT, EnvoyQuery, parse
from aviary.metrics.envoy_reports import Counts, EnvoyReports, percentile
from aviary.metrics.provider import MetricProviderError, MetricQueryError

__all__ = ["REPORT_GRACE", "EnvoyProvider", "Reporter", "not_reporting"]

REPORT_GRACE = 5.0
"""Seconds a serving proxy may go without a metrics report (flushes come every 0.5-1 s)."""
_QUANTILES = {"request-duration-p50": 0.5, "request-duration-p95": 0.95, "request-duration-p99": 0.99}
_CLASSES = {"error-rate-5xx": 5, "error-rate-4xx": 4}
_SHOWN = 5  # proxies named in an error

Reporter = tuple[str, float]
"""A proxy expected to report: (node id, when it connected, on the store's clock)."""


def not_reporting(reports: EnvoyReports, expected: Iterable[Reporter], now: float) -> list[str]:
    """The node ids of ``expected`` with no metrics report in the last ``REPORT_GRACE`` seconds."""
    silent: list[str] = []
    for node_id, connected_at in expected:
        if now - connected_at < REPORT_GRACE:
            continue
        proxy = reports.proxy(node_id)
        if proxy is None or proxy.metrics_at is None or now - proxy.metrics_at > REPORT_GRACE:
            silent.append(node_id)
    return sorted(set(silent))


class EnvoyProvider:
    """Answers ``EnvoyQuery`` texts from ``reports``; ``expected`` lists the proxies serving the rollout."""

    def __init__(self, reports: EnvoyReports, expected: Callable[[], Iterable[Reporter]] = lambda: ()) -> None:
        self._reports = reports
        self._expected = expected

    def __repr__(self) -> str:
        return "Envoy reports"

    def _ready(self) -> float:
        now = self._reports.now()
        silent = not_reporting(self._reports, self._expected(), now)
        if silent:
            names = ", ".join(silent[:_SHOWN]) + (f" and {len(silent) - _SHOWN} more" if len(silent) > _SHOWN else "")
            raise MetricProviderError(
                f"{self!r}: {len(silent)} serving prox{'y' if len(silent) == 1 else 'ies'} not reporting ({names}): "
                f"no metrics report for {REPORT_GRACE:g}s; configure the envoy.stat_sinks.metrics_service sink "
                "to the xDS cluster (deploy/envoy/bootstrap.yaml)")
        return now

    @staticmethod
    def _parse(query: str) -> EnvoyQuery:
        try:
            return parse(query)
        except ValueError as exc:
            raise MetricQueryError(str(exc)) from exc

    def _values(self, query: EnvoyQuery, edges: list[float]) -> list[float]:
        """The query's value over each interval (edges[i], edges[i + 1]]."""
        if query.template in _QUANTILES:
            quantile = _QUANTILES[query.template]
            return [percentile(values, quantile) for values in self._reports.duration_series(query.cluster, edges)]
        counted = self._reports.count_series(query.cluster, edges)
        return [_of_counts(query, counts, end - start)
                for counts, start, end in zip(counted, edges, edges[1:], strict=False)]

    async def query_scalar(self, query: str, timeout: float) -> float | None:
        parsed = self._parse(query)
        now = self._ready()
        return self._values(parsed, [now - parsed.window, now])[0]

    async def query_series(self, query: str, window: float, step: float, timeout: float) -> tuple[float, ...]:
        """One value per ``step`` over the last ``window`` (at most the store's horizon), oldest first;
        each measures its own step (the query's window is the step, as the judge renders it)."""
        parsed = self._parse(query)
        now = self._ready()
        count = int(min(window, self._reports.horizon) // step)
        if count <= 0:
            return ()
        return tuple(self._values(parsed, [now - (count - i) * step for i in range(count + 1)]))


def _of_counts(query: EnvoyQuery, counts: Counts, seconds: float) -> float:
    total = counts.total
    if query.template == REQUEST_COUNT:
        return total
    if query.template == "request-rate":
        return total / seconds
    if query.template == "request-rate-per-weight":
        return total / seconds / (query.weight or math.nan)
    if total <= 0:
        return math.nan
    if query.template == "request-success-rate":
        return 100.0 * (1.0 - counts.of_class(5) / total)
    if query.template in _CLASSES:
        return 100.0 * counts.of_class(_CLASSES[query.template]) / total
    raise MetricQueryError(f"the envoy provider cannot answer {query.template}")
