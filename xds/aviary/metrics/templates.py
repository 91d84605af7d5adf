"""PromQL for the built-in check templates, over Envoy's cluster stats as Prometheus scrapes them.

Envoy 1.40 exports (no ``_total`` suffix) ``envoy_cluster_upstream_rq_xx{envoy_cluster_name,
envoy_response_code_class}`` and the ``envoy_cluster_upstream_rq_time`` histogram (milliseconds).
Traps the queries are written around:

- A code-class series exists only after the first response of that class, so the 5xx count is
  ``(... or vector(0))`` and success is computed as ``100 * (1 - 5xx / all)``: counting non-5xx
  directly would give *no data* (inconclusive) for a canary whose every request fails, instead
  of 0% (a failure).
- Connection failures to a dead canary are counted as class 5 (503) in ``upstream_rq_xx`` but
  get no ``upstream_rq_time`` sample, so the request count (for minRequests) is taken from
  ``upstream_rq_xx`` too: a dead canary has plenty of requests and a 0% success rate.
- No traffic at all gives ``0/0`` = NaN for the success rate and NaN for p99: inconclusive.

Custom queries may use ``{{ canary }}`` and ``{{ stable }}`` (cluster names, to be put inside
quotes by the author) and ``{{ window }}`` (a Prometheus duration such as ``30s``).
"""

from __future__ import annotations

import math
import re

from aviary.policy.schema import MetricCheck

__all__ = ["TemplateError", "promql_duration", "render", "request_count_query", "template_query"]

_REQUESTS = "envoy_cluster_upstream_rq_xx"
_RQ_TIME_BUCKET = "envoy_cluster_upstream_rq_time_bucket"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class TemplateError(ValueError):
    """A check cannot be turned into PromQL (unknown template or placeholder)."""


def promql_duration(seconds: float) -> str:
    """A Prometheus duration: ``30s``, ``2m``, ``1h``, ``90s``, ``1500ms`` (whole milliseconds)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise TemplateError(f"window must be a positive duration, got {seconds!r}")
    millis = max(1, round(seconds * 1000))
    if millis % 1000:
        return f"{millis}ms"
    whole = millis // 1000
    for unit, size in (("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _label(value: str) -> str:
    """A PromQL string literal body (cluster names are [a-z0-9._-], but never trust that blindly)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _selector(metric: str, cluster: str, extra: str = "") -> str:
    return f'{metric}{{envoy_cluster_name="{_label(cluster)}"{extra}}}'


def _increase(selector: str, window: str) -> str:
    """Per-series growth over the window, counting series that appeared within it in full.

    Envoy creates a cluster's series lazily (the 5xx one at the first 5xx), so a new series starts
    at its first value. ``increase()`` needs two samples and would miss that first jump: a canary's
    first errors would read as 100 % success for a scrape. A series absent one window ago counts
    with its whole value instead.
    """
    return f"(({selector} unless {selector} offset {window}) or increase({selector}[{window}]))"


def request_count_query(cluster: str, window_seconds: float) -> str:
    """Requests ``cluster`` answered (any status, connection failures included) within the window."""
    window = promql_duration(window_seconds)
    return f"sum({_increase(_selector(_REQUESTS, cluster), window)}) or vector(0)"


def template_query(template: str, cluster: str, window_seconds: float) -> str:
    """The PromQL of a built-in template for one cluster (canary or stable)."""
    window = promql_duration(window_seconds)
    if template == "request-success-rate":
        server_errors = _selector(_REQUESTS, cluster, ',envoy_response_code_class="5"')
        errors = f"sum({_increase(server_errors, window)})"
        total = f"sum({_increase(_selector(_REQUESTS, cluster), window)})"
        return f"100 * (1 - (({errors} or vector(0)) / {total}))"
    if template == "request-duration-p99":
        buckets = f"sum by (le) (rate({_selector(_RQ_TIME_BUCKET, cluster)}[{window}]))"
        return f"histogram_quantile(0.99, {buckets})"
    if template == "request-rate":
        return f"sum(rate({_selector(_REQUESTS, cluster)}[{window}]))"
    raise TemplateError(f"unknown template {template!r}")


def render(check: MetricCheck, canary_cluster: str, stable_cluster: str, window_seconds: float) -> str:
    """The PromQL that measures the canary for ``check``."""
    if check.template is not None:
        return template_query(check.template, canary_cluster, window_seconds)
    if check.query is None:
        raise TemplateError(f"check {check.name!r} has neither template nor query")
    values = {"canary": _label(canary_cluster), "stable": _label(stable_cluster),
              "window": promql_duration(window_seconds)}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            known = ", ".join(f"{{{{ {key} }}}}" for key in values)
            raise TemplateError(
                f"check {check.name!r}: unknown placeholder {match.group(0)!r} (known: {known})")
        return values[name]

    return _PLACEHOLDER.sub(substitute, check.query)
