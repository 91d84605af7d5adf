"""Check kinds (threshold, compare), the new templates and the policy spelling of both."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.metrics.checks import check_round, run_checks
from aviary.metrics.kinds import PROMETHEUS, WEB, CompareCheck, RoundContext, ThresholdCheck, checks_of
from aviary.metrics.provider import MetricProviderError
from aviary.metrics.templates import Side, TemplateError, render, request_count_query, template_query
from aviary.policy.analysis import CheckOutcome, judge_compare
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout_machine import guard_analysis
from aviary.policy.rollout_state import WeightAcked
from aviary.policy.schema import Analysis, MetricCheck, PolicySet, Rollout
from aviary.runner import RolloutRunner
from tests.rig.policies import rollout_doc
from tests.rig.waiting import async_wait_until

CANARY = Side("shop_v2", "v2", 10)
STABLE = Side("shop_v1", "v1", 90)


def metric(**kwargs: Any) -> MetricCheck:
    return MetricCheck.model_validate({"name": "m", **kwargs})


def analysis(*metrics: dict[str, Any], **kwargs: Any) -> Analysis:
    return Analysis.model_validate({"window": "30s", "minRequests": 20, "metrics": list(metrics), **kwargs})


@dataclass
class Scripted:
    """A provider answering from a dict (query -> number, None, or an exception); records what it was asked."""

    values: dict[str, float | Exception | None]
    asked: list[str] = field(default_factory=list)

    async def query_scalar(self, query: str, timeout: float) -> float | None:
        self.asked.append(query)
        value = self.values.get(query)
        if isinstance(value, Exception):
            raise value
        return value

    async def query_series(self, query: str, window: float, step: float, timeout: float) -> tuple[float, ...]:
        raise AssertionError("no kind shipped here asks for series")


# ----------------------------------------------------------------------------------- compare rule


@pytest.mark.parametrize(("compare", "value", "stable", "outcome", "reason"), [
    ({"by": "ratio", "max": 1.2}, 130.0, 100.0, CheckOutcome.FAIL, "canary 130 / stable 100 = 1.3 > max (1.2)"),
    ({"by": "ratio", "max": 1.2}, 110.0, 100.0, CheckOutcome.PASS, "canary 110 / stable 100 = 1.1 <= max (1.2)"),
    ({"by": "ratio", "min": 0.9, "max": 1.1}, 100.0, 100.0, CheckOutcome.PASS,
     "canary 100 / stable 100 = 1 >= min (0.9) and <= max (1.1)"),
    ({"by": "ratio", "min": 0.9}, 80.0, 100.0, CheckOutcome.FAIL, "canary 80 / stable 100 = 0.8 < min (0.9)"),
    ({"by": "ratio", "max": 2}, 0.0, 0.0, CheckOutcome.PASS, "canary 0 / stable 0 = 1 <= max (2)"),
    ({"by": "ratio", "max": 2}, 0.5, 0.0, CheckOutcome.FAIL, "canary 0.5 / stable 0 = inf > max (2)"),
    ({"by": "difference", "min": -0.5}, 99.2, 100.0, CheckOutcome.FAIL,
     "canary 99.2 - stable 100 = -0.8 < min (-0.5)"),
    ({"by": "difference", "max": 1}, 1.5, 1.0, CheckOutcome.PASS, "canary 1.5 - stable 1 = 0.5 <= max (1)"),
])
def test_compare_rule(compare: dict[str, Any], value: float, stable: float, outcome: CheckOutcome,
                      reason: str) -> None:
    result = judge_compare(metric(template="request-duration-p99", compare=compare), value, stable, 100, 20)
    assert (result.outcome, result.reason, result.kind) == (outcome, reason, "compare")
    assert result.thresholds.by == compare["by"]


@pytest.mark.parametrize(("value", "stable", "requests", "reason"), [
    (None, 1.0, 100, "value: no data"),
    (math.nan, 1.0, 100, "value: NaN"),
    (1.0, None, 100, "stable value: no data"),
    (1.0, math.nan, 100, "stable value: NaN"),
    (1.0, 1.0, 5, "canary requests (5) < minRequests (20)"),
    (1.0, 1.0, None, "no request count for the canary"),
])
def test_compare_without_an_answer_is_inconclusive(value: float | None, stable: float | None,
                                                   requests: float | None, reason: str) -> None:
    check = metric(template="request-duration-p99", compare={"by": "ratio", "max": 1.2})
    result = judge_compare(check, value, stable, requests, 20)
    assert (result.outcome, result.reason) == (CheckOutcome.INCONCLUSIVE, reason)


# ------------------------------------------------------------------------------------ the kinds


def test_kinds_follow_the_fields() -> None:
    a = analysis({"name": "p99", "template": "request-duration-p99", "max": 500},
                 {"name": "p99-vs", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}})
    kinds = checks_of(a)
    assert [type(k) for k in kinds] == [ThresholdCheck, CompareCheck]
    assert [k.kind for k in kinds] == ["threshold", "compare"]
    assert [m.kind for m in a.metrics] == ["threshold", "compare"]


def test_compare_plans_the_same_query_for_both_sides() -> None:
    a = analysis({"name": "q", "query": 'sum(rate(x{cluster="{{ canary }}"}[{{ window }}]))',
                  "compare": {"by": "ratio", "max": 2}})
    asks = checks_of(a)[0].plan(RoundContext(a, CANARY, STABLE))
    assert [(ask.source, ask.query) for ask in asks] == [
        (PROMETHEUS, 'sum(rate(x{cluster="shop_v2"}[30s]))'), (PROMETHEUS, 'sum(rate(x{cluster="shop_v1"}[30s]))')]


def test_compare_of_a_query_that_ignores_the_version_is_refused() -> None:
    a = analysis({"name": "q", "query": 'sum(up{v="{{ canary_version }}"})', "compare": {"by": "ratio", "max": 2}})
    same = Side("shop_v1", "v1", 10)  # cannot happen in a rollout; the plan still refuses it
    with pytest.raises(TemplateError, match="render the same query"):
        checks_of(a)[0].plan(RoundContext(a, same, STABLE))


async def test_a_round_with_both_kinds() -> None:
    a = analysis({"name": "success", "template": "request-success-rate", "min": 99},
                 {"name": "p99-vs", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}})
    p99_canary = template_query("request-duration-p99", CANARY, 30)
    p99_stable = template_query("request-duration-p99", STABLE, 30)
    provider = Scripted({request_count_query("shop_v2", 30): 400.0,
                         template_query("request-success-rate", CANARY, 30): 99.5,
                         p99_canary: 300.0, p99_stable: 200.0})
    results = await run_checks(provider, a, CANARY, STABLE)
    assert [(r.name, r.kind, r.outcome) for r in results] == [
        ("success", "threshold", CheckOutcome.PASS), ("p99-vs", "compare", CheckOutcome.FAIL)]
    assert results[1].queries == (p99_canary, p99_stable)
    assert (results[1].value, results[1].stable_value) == (300.0, 200.0)
    assert results[1].reason == "canary 300 / stable 200 = 1.5 > max (1.2)"
    assert results[0].queries == (template_query("request-success-rate", CANARY, 30),)
    assert len(provider.asked) == len(set(provider.asked)) == 4


async def test_a_provider_error_keeps_its_message() -> None:
    a = analysis({"name": "p99-vs", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}})
    error = MetricProviderError("Prometheus http://x answered HTTP 422 (execution): query timed out")
    provider = Scripted({request_count_query("shop_v2", 30): 400.0,
                         template_query("request-duration-p99", STABLE, 30): error})
    (result,) = await run_checks(provider, a, CANARY, STABLE)
    assert (result.outcome, result.reason) == (CheckOutcome.INCONCLUSIVE, str(error))


async def test_web_checks_go_to_the_web_provider() -> None:
    a = analysis({"name": "orders", "web": {"url": "http://127.0.0.1:1/stats?v={{ canary_version }}",
                                            "jsonPath": "$.rate"}, "min": 5},
                 minRequests=0)
    prometheus = Scripted({request_count_query("shop_v2", 30): 0.0})
    web = Scripted({"http://127.0.0.1:1/stats?v=v2#$.rate": 7.0})
    (result,) = await run_checks({PROMETHEUS: prometheus, WEB: web}, a, CANARY, STABLE)
    assert (result.outcome, result.value) == (CheckOutcome.PASS, 7.0)
    assert web.asked == ["http://127.0.0.1:1/stats?v=v2#$.rate"]
    (alone,) = await run_checks(prometheus, a, CANARY, STABLE)  # no web provider given
    assert (alone.outcome, alone.reason) == (CheckOutcome.INCONCLUSIVE, "no web provider for this round")


async def test_a_late_round_is_inconclusive_for_every_kind() -> None:
    a = analysis({"name": "success", "template": "request-success-rate", "min": 99},
                 {"name": "p99-vs", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}})
    times = iter([0.0, 100.0])
    _, results = await check_round(Scripted({}), a, CANARY, STABLE, lambda: next(times))
    assert [(r.kind, r.outcome, r.value) for r in results] == [
        ("threshold", CheckOutcome.INCONCLUSIVE, None), ("compare", CheckOutcome.INCONCLUSIVE, None)]
    assert all("too old to judge" in r.reason for r in results)


def test_the_after_promotion_window_leaves_compare_checks_out() -> None:
    a = analysis({"name": "success", "template": "request-success-rate", "min": 99},
                 {"name": "p99-vs", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}})
    guarded = guard_analysis(a)
    assert guarded is not None and [m.name for m in guarded.metrics] == ["success"]
    assert guard_analysis(analysis({"name": "vs", "template": "request-rate", "compare": {"by": "ratio", "min": 1}})) \
        is None


# ------------------------------------------------------------------------------------- templates

_ALL = 'envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop_v2"}'


def _increase(selector: str) -> str:
    return f"(({selector} unless {selector} offset 30s) or increase({selector}[30s]))"


def test_error_rate_templates() -> None:
    for code_class, template in (("5", "error-rate-5xx"), ("4", "error-rate-4xx")):
        labels = f'envoy_cluster_name="shop_v2",envoy_response_code_class="{code_class}"'
        errors = f"envoy_cluster_upstream_rq_xx{{{labels}}}"
        assert template_query(template, CANARY, 30) == \
            f"100 * ((sum({_increase(errors)}) or vector(0)) / sum({_increase(_ALL)}))"


@pytest.mark.parametrize(("template", "quantile"), [
    ("request-duration-p50", "0.5"), ("request-duration-p95", "0.95"), ("request-duration-p99", "0.99")])
def test_latency_percentiles(template: str, quantile: str) -> None:
    assert template_query(template, CANARY, 30) == (
        f"histogram_quantile({quantile}, sum by (le) "
        '(rate(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="shop_v2"}[30s])))')


def test_request_rate_per_weight_divides_by_each_sides_share() -> None:
    rate = 'sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop_v2"}[30s]))'
    assert template_query("request-rate-per-weight", CANARY, 30) == f"{rate} / 10"
    assert template_query("request-rate-per-weight", STABLE, 30) == f"{rate.replace('v2', 'v1')} / 90"
    with pytest.raises(TemplateError, match="weight 0"):
        template_query("request-rate-per-weight", Side("shop_v2", "v2", 0), 30)
    with pytest.raises(TemplateError, match="weight of shop_v2 is not known"):
        template_query("request-rate-per-weight", "shop_v2", 30)


def test_version_templates_select_by_the_version_label() -> None:
    def q(template: str, metric: str | None = None) -> str:
        return template_query(template, CANARY, 30, version_label="version", metric=metric)

    rate = 'sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop_v2"}[30s]))'
    assert q("version-rate", "orders_completed_total") == 'sum(rate(orders_completed_total{version="v2"}[30s]))'
    assert q("version-rate-per-request", "orders_completed_total") == \
        f'sum(rate(orders_completed_total{{version="v2"}}[30s])) / {rate}'
    assert q("version-cpu") == 'avg(rate(process_cpu_seconds_total{version="v2"}[30s]))'
    assert q("version-cpu-per-request") == f'sum(rate(process_cpu_seconds_total{{version="v2"}}[30s])) / {rate}'
    assert q("version-memory") == 'avg(avg_over_time(process_resident_memory_bytes{version="v2"}[30s]))'
    assert q("version-gc-pause") == ('sum(rate(go_gc_duration_seconds_sum{version="v2"}[30s])) / '
                                     'sum(rate(go_gc_duration_seconds_count{version="v2"}[30s]))')
    assert q("version-gc-pause", "jvm_gc_pause_seconds").startswith('sum(rate(jvm_gc_pause_seconds_sum{version="v2"}')
    with pytest.raises(TemplateError, match=r"needs analysis\.versionLabel"):
        template_query("version-cpu", CANARY, 30)
    with pytest.raises(TemplateError, match="version of shop_v2 is not known"):
        template_query("version-cpu", "shop_v2", 30, version_label="version")


def test_custom_query_version_placeholders_and_swapped_sides() -> None:
    check = metric(query='sum(rate(orders_total{ {{ version_label }}="{{ canary_version }}"}[{{ window }}]))',
                   compare={"by": "ratio", "min": 0.9})
    assert render(check, CANARY, STABLE, 30, "version") == 'sum(rate(orders_total{ version="v2"}[30s]))'
    assert render(check, STABLE, CANARY, 30, "version") == 'sum(rate(orders_total{ version="v1"}[30s]))'
    with pytest.raises(TemplateError, match=r"set analysis\.versionLabel"):
        render(check, CANARY, STABLE, 30)


def test_web_url_placeholders_are_url_encoded() -> None:
    check = metric(web={"url": "http://127.0.0.1:8080/m?cluster={{ canary }}&w={{ window }}", "jsonPath": "$.x"},
                   max=1)
    assert render(check, Side("a b", "v"), STABLE, 30) == "http://127.0.0.1:8080/m?cluster=a%20b&w=30s#$.x"


# ------------------------------------------------------------------------------- policy spelling

HEAD = """apiVersion: aviary.dev/v1
kind: Rollout
metadata: {name: shop}
spec:
  listener: {port: 10000}
  hosts: ["*"]
  version: v1
  endpoints: ["127.0.0.1:8081"]
  analysis:
    prometheus: http://127.0.0.1:9090
"""


def errors_of(analysis_yaml: str) -> list[str]:
    rollout, errors = parse_policy_text(HEAD + analysis_yaml, "shop.yaml")
    assert (rollout is None) == bool(errors)
    return [str(error) for error in errors]


def test_a_policy_with_every_kind_and_source_loads() -> None:
    assert errors_of("""    versionLabel: version
    metrics:
      - {name: success, template: request-success-rate, min: 99}
      - {name: errors-vs, template: error-rate-5xx, compare: {by: difference, max: 1}}
      - {name: p95-vs, template: request-duration-p95, compare: {by: ratio, max: 1.2}}
      - {name: orders, template: version-rate-per-request, metric: orders_completed_total,
         compare: {by: ratio, min: 0.9}}
      - {name: memory, template: version-memory, compare: {by: ratio, max: 1.5}}
      - {name: web, web: {url: "http://127.0.0.1:8080/stats?v={{ canary_version }}", jsonPath: "$.rate"}, max: 5}
""") == []


@pytest.mark.parametrize(("metrics", "expected"), [
    ("[{name: a, template: request-rate, compare: {by: ratio}}]",
     "shop.yaml: spec.analysis.metrics[0].compare: needs a bound: min, max or both (e.g. {by: ratio, max: 1.2})"),
    ("[{name: a, template: request-rate, compare: {by: percent, max: 1}}]",
     "shop.yaml: spec.analysis.metrics[0].compare.by: input should be 'ratio' or 'difference', got 'percent'"),
    ("[{name: a, template: request-rate, max: 3, compare: {by: ratio, max: 1}}]",
     "shop.yaml: spec.analysis.metrics[0].max: a compare check keeps its bounds inside compare: {by, min, max}"),
    ("[{name: a, template: request-rate, compare: {by: ratio, min: 2, max: 1}}]",
     "shop.yaml: spec.analysis.metrics[0].compare.min: min (2) is greater than max (1)"),
    ("[{name: a, template: version-cpu, max: 1}]",
     "shop.yaml: spec.analysis.metrics[0].template: template version-cpu selects the version by a label: set "
     "analysis.versionLabel (e.g. versionLabel: version)"),
    ("[{name: a, template: version-rate, max: 1}]",
     "shop.yaml: spec.analysis.metrics[0].metric: template version-rate needs metric: the name of the "
     "application's metric, e.g. orders_completed_total"),
    ("[{name: a, template: request-rate, metric: x, max: 1}]",
     "shop.yaml: spec.analysis.metrics[0].metric: only for the templates version-rate, version-rate-per-request, "
     "version-gc-pause"),
    ("[{name: a, template: request-p99, max: 1}]",
     "shop.yaml: spec.analysis.metrics[0].template: unknown template 'request-p99' (one of request-success-rate, "
     "error-rate-5xx, error-rate-4xx, request-duration-p50, request-duration-p95, request-duration-p99, "
     "request-rate, request-rate-per-weight, version-rate, version-rate-per-request, version-cpu, "
     "version-cpu-per-request, version-memory, version-gc-pause)"),
    ("[{name: a, web: {url: 'ftp://x/y', jsonPath: $.a}, max: 1}]",
     "shop.yaml: spec.analysis.metrics[0].web.url: expected an http(s) URL such as http://127.0.0.1:9090, "
     "got 'ftp://x/y'"),
    ("[{name: a, web: {url: 'http://x/y', jsonPath: '$.a[?(@.b)]'}, max: 1}]",
     "shop.yaml: spec.analysis.metrics[0].web.jsonPath: invalid JSONPath '$.a[?(@.b)]' at '[?(@.b)]': "
     "supported are .name, ['name'], [N], [*] and .*"),
    ("[{name: a, web: {url: 'http://x/y', jsonPath: $.a}, query: 'up', max: 1}]",
     "shop.yaml: spec.analysis.metrics[0]: give exactly one of template, query or web"),
    ("[{name: a, query: 'sum(up)', compare: {by: ratio, max: 2}}]",
     "shop.yaml: spec.analysis.metrics[0].query: a compare check runs this for canary and stable: select the "
     "version with {{ canary }} or {{ canary_version }} (swapped for the stable side)"),
    ("[{name: a, web: {url: 'http://x/y', jsonPath: $.a}, compare: {by: ratio, max: 2}}]",
     "shop.yaml: spec.analysis.metrics[0].web.url: a compare check runs this for canary and stable: select the "
     "version with {{ canary }} or {{ canary_version }} (swapped for the stable side)"),
    ("[{name: a, query: 'up', maxDecreaseFromStable: 1}]",
     "shop.yaml: spec.analysis.metrics[0].maxDecreaseFromStable: only works with a template (a custom query has "
     "no stable counterpart; use compare: {by: difference, min: -N})"),
])
def test_bad_checks_are_one_line_naming_file_and_field(metrics: str, expected: str) -> None:
    assert errors_of(f"    metrics: {metrics}\n") == [expected]


def test_bad_version_label() -> None:
    assert errors_of("    versionLabel: 'app version'\n    metrics: [{name: a, template: request-rate, max: 1}]\n") == [
        "shop.yaml: spec.analysis.versionLabel: invalid Prometheus label name 'app version': letters, digits "
        "and '_', e.g. version"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_new_templates_evaluate_as_intended_in_prometheus(tmp_path: Path) -> None:
    """`promtool test rules` evaluates the exact rendered queries over synthetic Envoy and application series."""

    def rq_xx(cluster: str, code_class: str, values: str) -> dict[str, str]:
        labels = f'envoy_cluster_name="{cluster}",envoy_response_code_class="{code_class}",instance="e1"'
        return {"series": f"envoy_cluster_upstream_rq_xx{{{labels}}}", "values": values}

    def bucket(le: str, values: str) -> dict[str, str]:
        return {"series": f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="ok",le="{le}"}}',
                "values": values}

    def app(metric: str, version: str, instance: str, values: str) -> dict[str, str]:
        return {"series": f'{metric}{{version="{version}",instance="{instance}"}}', "values": values}

    series = [
        rq_xx("ok", "2", "0+10x60"),
        rq_xx("dead", "5", "0+10x60"),
        rq_xx("half", "2", "0+5x60"), rq_xx("half", "5", "0+3x60"), rq_xx("half", "4", "0+2x60"),
        bucket("10", "0+9x60"), bucket("100", "0+10x60"), bucket("+Inf", "0+10x60"),
        app("orders_completed_total", "v2", "a", "0+2x60"), app("orders_completed_total", "v1", "a", "0+9x60"),
        app("process_cpu_seconds_total", "v2", "a", "0+0.5x60"),
        app("process_cpu_seconds_total", "v2", "b", "0+0.3x60"),
        app("process_resident_memory_bytes", "v2", "a", "100x60"),
        app("process_resident_memory_bytes", "v2", "b", "300x60"),
        app("go_gc_duration_seconds_sum", "v2", "a", "0+0.002x60"),
        app("go_gc_duration_seconds_count", "v2", "a", "0+1x60"),
    ]

    def expect(query: str, value: float | None) -> dict[str, Any]:
        """Rounded to millionths: promtool compares floats exactly, and 0.5 + 0.3 is not 0.8."""
        samples = [] if value is None else [{"labels": "{}", "value": round(value * 1e6)}]
        return {"expr": f"round(({query}) * 1000000)", "eval_time": "60s", "exp_samples": samples}

    ok, v2 = Side("ok", "v2", 10), {"version_label": "version"}
    tests = [
        expect(template_query("error-rate-5xx", "ok", 30), 0),
        expect(template_query("error-rate-5xx", "dead", 30), 100),
        expect(template_query("error-rate-5xx", "half", 30), 30),
        expect(template_query("error-rate-4xx", "half", 30), 20),
        expect(template_query("error-rate-4xx", "missing", 30), None),
        expect(template_query("request-duration-p50", "ok", 30), 10 * 5 / 9),
        expect(template_query("request-duration-p95", "ok", 30), 55),
        expect(template_query("request-rate-per-weight", ok, 30), 1),
        expect(template_query("version-rate", ok, 30, metric="orders_completed_total", **v2), 2),
        expect(template_query("version-rate-per-request", ok, 30, metric="orders_completed_total", **v2), 0.2),
        expect(template_query("version-cpu", ok, 30, **v2), 0.4),
        expect(template_query("version-cpu-per-request", ok, 30, **v2), 0.08),
        expect(template_query("version-memory", ok, 30, **v2), 200),
        expect(template_query("version-gc-pause", ok, 30, **v2), 0.002),
    ]
    doc = {"evaluation_interval": "1s",
           "tests": [{"interval": "1s", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "templates_test.yml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------ the runner


@dataclass(repr=False)
class Recording(Scripted):
    name: str = "recording"
    closed: bool = False

    def __repr__(self) -> str:
        return self.name

    def close(self) -> None:
        self.closed = True


async def test_the_runner_gives_each_source_its_provider_with_versions_and_weights(
        caplog: pytest.LogCaptureFixture) -> None:
    """The runner makes the web provider at the first web check, renders version and weight for both
    sides, logs a failing web source once, and closes every provider when its loop ends."""
    def rollout(version: str) -> Rollout:
        doc = rollout_doc("shop", version, steps=(20, 50))
        doc["spec"]["analysis"] = {
            "prometheus": "http://prometheus.invalid:9090", "checkEvery": "0.2s", "minRequests": 1,
            "metrics": [
                {"name": "per-weight", "template": "request-rate-per-weight", "compare": {"by": "ratio", "min": 0.5}},
                {"name": "orders", "web": {"url": "http://127.0.0.1:1/o/{{ canary_version }}", "jsonPath": "$.n"},
                 "compare": {"by": "ratio", "min": 0.9}}]}
        return Rollout.model_validate(doc)

    down = MetricProviderError("web GET http://127.0.0.1:1/o/v1 unreachable: connection refused")
    prometheus, web = Recording({}, name="Prometheus"), Recording({"http://127.0.0.1:1/o/v1#$.n": down}, name="web")
    made: list[Recording] = []

    def web_factory() -> Recording:
        made.append(web)
        return web

    runner = RolloutRunner(TrafficDirector(SnapshotCache(), ProxyStatus()), provider_factory=lambda url: prometheus,
                           clock=time.monotonic, web_factory=web_factory)
    runner.apply_policies(PolicySet({"shop": rollout("v1")}))
    runner.apply_policies(PolicySet({"shop": rollout("v2")}))
    runner.handle("shop", WeightAcked("v2", 20, time.monotonic()))
    task = asyncio.create_task(runner.run())
    try:
        await async_wait_until(lambda: len(web.asked) >= 4, 5.0, what="two rounds of web checks")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert made == [web]  # one web provider for every round
    assert set(web.asked) == {"http://127.0.0.1:1/o/v2#$.n", "http://127.0.0.1:1/o/v1#$.n"}
    rate = 'sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop_%s"}[30s]))'
    assert {rate % "v2" + " / 20", rate % "v1" + " / 80"} <= set(prometheus.asked)
    assert prometheus.closed and web.closed
    warnings = [r.getMessage() for r in caplog.records if "inconclusive" in r.getMessage()]
    assert warnings == [f"rollout shop: checks inconclusive: {down}"]
