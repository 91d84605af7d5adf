"""PromQL for the built-in check templates, and the rendering of custom queries and web URLs.

Envoy templates read Envoy 1.40's cluster stats as Prometheus scrapes them (no ``_total``
suffix): ``envoy_cluster_upstream_rq_xx{envoy_cluster_name, envoy_response_code_class}`` and the
``envoy_cluster_upstream_rq_time`` histogram (milliseconds). Traps the queries are written around:

- A code-class series exists only after the first response of that class, so the 5xx count is
  ``(... or vector(0))`` and success is computed as ``100 * (1 - 5xx / all)``: counting non-5xx
  directly would give *no data* (inconclusive) for a canary whose every request fails, instead
  of 0% (a failure).
- Connection failures to a dead canary are counted as class 5 (503) in ``upstream_rq_xx`` but
  get no ``upstream_rq_time`` sample, so the request count (for minRequests) is taken from
  ``upstream_rq_xx`` too: a dead canary has plenty of requests and a 0% success rate.
- No traffic at all gives ``0/0`` = NaN for the rates and NaN for the percentiles: inconclusive.

Version templates read the application's own metrics, selected by ``analysis.versionLabel``
(``{version="v2"}``): the backends (or Prometheus' relabelling) must label them with the version
of the policy. CPU, memory and GC names are those of the Prometheus client libraries' process and
runtime collectors (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``go_gc_duration_seconds``; ``metric:`` names another summary, e.g. ``jvm_gc_pause_seconds``).

Every query measures one *side* (canary or stable). Custom queries and web URLs may use
``{{ canary }}``/``{{ stable }}`` (cluster names), ``{{ canary_version }}``/``{{ stable_version }}``,
``{{ version_label }}`` and ``{{ window }}`` (a Prometheus duration such as ``30s``); the stable side
of a ``compare`` check renders the same text with canary and stable swapped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from aviary.policy.schema import JudgeMetricSpec, MetricCheck

__all__ = [
    "CPU_SECONDS",
    "GC_PAUSE_SECONDS",
    "RESIDENT_MEMORY",
    "Side",
    "TemplateError",
    "promql_duration",
    "render",
    "request_count_query",
    "template_query",
]

_REQUESTS = "envoy_cluster_upstream_rq_xx"
_RQ_TIME_BUCKET = "envoy_cluster_upstream_rq_time_bucket"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_QUANTILES = {"request-duration-p50": "0.5", "request-duration-p95": "0.95", "request-duration-p99": "0.99"}
_CODE_CLASSES = {"error-rate-5xx": "5", "error-rate-4xx": "4"}
CPU_SECONDS = "process_cpu_seconds_total"
"""Counter of CPU seconds a process used (every official Prometheus client library exports it)."""
RESIDENT_MEMORY = "process_resident_memory_bytes"
"""Gauge of a process' resident memory (bytes)."""
GC_PAUSE_SECONDS = "go_gc_duration_seconds"
"""Summary of GC pauses (seconds): Go's client default; ``metric:`` names another (``_sum``/``_count``)."""


class TemplateError(ValueError):
    """A check cannot be turned into a query (unknown template or placeholder, missing version)."""


@dataclass(frozen=True, slots=True)
class Side:
    """One side of a comparison: the canary or the stable version, as the queries select it.

    ``version`` is the policy's version string (for ``versionLabel`` selectors); ``weight`` the
    percent of the weighted split it gets (for ``request-rate-per-weight``). Empty / None: unknown,
    and a template that needs it cannot be rendered.
    """

    cluster: str
    version: str = ""
    weight: int | None = None

    @classmethod
    def of(cls, side: Side | str) -> Side:
        """A cluster name alone is a side without version or weight (what older callers pass)."""
        return side if isinstance(side, Side) else cls(side)


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


def _version_selector(metric: str, side: Side, label: str | None, template: str) -> str:
    if not label:
        raise TemplateError(f"template {template} needs analysis.versionLabel")
    if not side.version:
        raise TemplateError(f"template {template}: the version of {side.cluster} is not known")
    return f'{metric}{{{label}="{_label(side.version)}"}}'


def template_query(template: str, side: Side | str, window_seconds: float, *, version_label: str | None = None,
                   metric: str | None = None) -> str:
    """The PromQL of a built-in template for one side (canary or stable)."""
    side = Side.of(side)
    cluster = side.cluster
    window = promql_duration(window_seconds)
    requests_rate = f"sum(rate({_selector(_REQUESTS, cluster)}[{window}]))"
    if template == "request-success-rate":
        server_errors = _selector(_REQUESTS, cluster, ',envoy_response_code_class="5"')
        errors = f"sum({_increase(server_errors, window)})"
        total = f"sum({_increase(_selector(_REQUESTS, cluster), window)})"
        return f"100 * (1 - (({errors} or vector(0)) / {total}))"
    if template in _CODE_CLASSES:
        code_class = _CODE_CLASSES[template]
        failing = _selector(_REQUESTS, cluster, f',envoy_response_code_class="{code_class}"')
        errors = f"sum({_increase(failing, window)})"
        total = f"sum({_increase(_selector(_REQUESTS, cluster), window)})"
        return f"100 * (({errors} or vector(0)) / {total})"
    if template in _QUANTILES:
        buckets = f"sum by (le) (rate({_selector(_RQ_TIME_BUCKET, cluster)}[{window}]))"
        return f"histogram_quantile({_QUANTILES[template]}, {buckets})"
    if template == "request-rate":
        return requests_rate
    if template == "request-rate-per-weight":
        if side.weight is None:
            raise TemplateError(f"template {template}: the weight of {cluster} is not known")
        if side.weight <= 0:
            raise TemplateError(f"template {template}: {cluster} has weight 0, nothing to divide by")
        return f"{requests_rate} / {side.weight}"
    if template == "version-rate" and metric:
        return f"sum(rate({_version_selector(metric, side, version_label, template)}[{window}]))"
    if template == "version-rate-per-request" and metric:
        return f"sum(rate({_version_selector(metric, side, version_label, template)}[{window}])) / {requests_rate}"
    if template == "version-cpu":
        return f"avg(rate({_version_selector(CPU_SECONDS, side, version_label, template)}[{window}]))"
    if template == "version-cpu-per-request":
        cpu = f"sum(rate({_version_selector(CPU_SECONDS, side, version_label, template)}[{window}]))"
        return f"{cpu} / {requests_rate}"
    if template == "version-memory":
        memory = _version_selector(RESIDENT_MEMORY, side, version_label, template)
        return f"avg(avg_over_time({memory}[{window}]))"
    if template == "version-gc-pause":
        summary = metric or GC_PAUSE_SECONDS
        pauses = _version_selector(f"{summary}_sum", side, version_label, template)
        count = _version_selector(f"{summary}_count", side, version_label, template)
        return f"sum(rate({pauses}[{window}])) / sum(rate({count}[{window}]))"
    if template in ("version-rate", "version-rate-per-request"):
        raise TemplateError(f"template {template} needs metric")
    raise TemplateError(f"unknown template {template!r}")


def render(check: MetricCheck | JudgeMetricSpec, measured: Side | str, other: Side | str, window_seconds: float,
           version_label: str | None = None) -> str:
    """The query that measures ``measured`` for ``check`` (the canary, or the stable side of a
    compare check with the roles swapped): PromQL, or ``URL#JSONPATH`` for a web check."""
    measured, other = Side.of(measured), Side.of(other)
    if check.template is not None:
        return template_query(check.template, measured, window_seconds, version_label=version_label,
                              metric=check.metric)
    if check.web is not None:
        url = _substitute(check, check.web.url, measured, other, window_seconds, version_label,
                          lambda text: quote(text, safe=""))
        return f"{url}#{check.web.json_path}"
    if check.query is None:
        raise TemplateError(f"check {check.name!r} has neither template, query nor web")
    return _substitute(check, check.query, measured, other, window_seconds, version_label, _label)


def _substitute(check: MetricCheck | JudgeMetricSpec, text: str, measured: Side, other: Side, window_seconds: float,
                version_label: str | None, escape: Callable[[str], str]) -> str:
    values = {"canary": escape(measured.cluster), "stable": escape(other.cluster),
              "window": promql_duration(window_seconds),
              "canary_version": escape(measured.version), "stable_version": escape(other.version),
              "version_label": version_label or ""}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            known = ", ".join(f"{{{{ {key} }}}}" for key in values)
            raise TemplateError(
                f"check {check.name!r}: unknown placeholder {match.group(0)!r} (known: {known})")
        if not values[name]:
            raise TemplateError(f"check {check.name!r}: {match.group(0)} is not known here"
                                + (" (set analysis.versionLabel)" if name == "version_label" else ""))
        return values[name]

    return _PLACEHOLDER.sub(substitute, text)
