"""PromQL rendering, exactly; and the judge fed with answers shaped like Prometheus' /api/v1/query."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from aviary.metrics.prometheus import scalar_from_result
from aviary.metrics.provider import MetricQueryError
from aviary.metrics.templates import (
    TemplateError,
    promql_duration,
    render,
    request_count_query,
    template_query,
)
from aviary.policy.analysis import CheckOutcome, judge
from aviary.policy.schema import MetricCheck

DATA = Path(__file__).parent / "data"


def check(**kwargs: Any) -> MetricCheck:
    return MetricCheck.model_validate({"name": "m", "max": 1.0, **kwargs})


_ERRORS = 'envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop-v2",envoy_response_code_class="5"}'
_ALL = 'envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop-v2"}'


def _increase(selector: str) -> str:
    return f"(({selector} unless {selector} offset 30s) or increase({selector}[30s]))"


SUCCESS_RATE = f"100 * (1 - ((sum({_increase(_ERRORS)}) or vector(0)) / sum({_increase(_ALL)})))"
P99 = ('histogram_quantile(0.99, sum by (le) '
       '(rate(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="shop-v2"}[30s])))')
RATE = 'sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="shop-v2"}[30s]))'
COUNT = f"sum({_increase(_ALL)}) or vector(0)"


@pytest.mark.parametrize(("template", "expected"), [
    ("request-success-rate", SUCCESS_RATE),
    ("request-duration-p99", P99),
    ("request-rate", RATE),
])
def test_builtin_templates_render_exactly(template: str, expected: str) -> None:
    assert render(check(template=template), "shop-v2", "shop-v1", 30.0) == expected
    assert template_query(template, "shop-v2", 30.0) == expected


def test_the_stable_side_of_a_template_names_the_stable_cluster() -> None:
    assert template_query("request-rate", "shop-v1", 30.0) == RATE.replace("shop-v2", "shop-v1")


def test_request_count_query() -> None:
    assert request_count_query("shop-v2", 30.0) == COUNT
    assert request_count_query("shop-v2", 120.0) == COUNT.replace("30s", "2m")


@pytest.mark.parametrize(("seconds", "text"), [
    (30.0, "30s"), (1.0, "1s"), (90.0, "90s"), (120.0, "2m"), (3600.0, "1h"), (5400.0, "90m"),
    (0.5, "500ms"), (1.5, "1500ms"), (0.0004, "1ms"),
])
def test_window_renders_as_a_prometheus_duration(seconds: float, text: str) -> None:
    assert promql_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf])
def test_window_must_be_positive(seconds: float) -> None:
    with pytest.raises(TemplateError):
        promql_duration(seconds)


def test_custom_query_placeholders() -> None:
    custom = check(query='sum(rate(my_errors{cluster="{{ canary }}"}[{{window}}]))'
                         ' / sum(rate(my_errors{cluster="{{  stable  }}"}[{{ window }}]))')
    assert render(custom, "shop-v2", "shop-v1", 60.0) == (
        'sum(rate(my_errors{cluster="shop-v2"}[1m])) / sum(rate(my_errors{cluster="shop-v1"}[1m]))')


def test_custom_query_without_placeholders_is_kept_verbatim() -> None:
    assert render(check(query="vector(1)"), "a", "b", 30.0) == "vector(1)"


def test_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"unknown placeholder '\{\{ canry \}\}'"):
        render(check(query="up{job='{{ canry }}'}"), "shop-v2", "shop-v1", 30.0)


def test_label_values_are_escaped() -> None:
    assert template_query("request-rate", 'we"ird\\', 30.0) == \
        'sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="we\\"ird\\\\"}[30s]))'


# ------------------------------------------------------------- judge on recorded Prometheus answers


def answer(name: str) -> float | None:
    body = json.loads((DATA / f"prom_{name}.json").read_text())
    assert body["status"] == "success"
    return scalar_from_result(body["data"]["result"])


SUCCESS_CHECK = check(template="request-success-rate", max=None, min=99.0)
P99_CHECK = check(template="request-duration-p99", max=250.0)


@pytest.mark.parametrize(("metric", "value", "requests", "outcome", "reason"), [
    (SUCCESS_CHECK, "success_rate_ok", "request_count", CheckOutcome.PASS, "99.8333 >= min (99)"),
    (SUCCESS_CHECK, "success_rate_failing", "request_count", CheckOutcome.FAIL, "42.5 < min (99)"),
    (SUCCESS_CHECK, "success_rate_all_failing", "request_count", CheckOutcome.FAIL, "0 < min (99)"),
    (SUCCESS_CHECK, "success_rate_ok", "request_count_low", CheckOutcome.INCONCLUSIVE,
     "canary requests (12) < minRequests (20)"),
    (SUCCESS_CHECK, "empty", "request_count", CheckOutcome.INCONCLUSIVE, "value: no data"),
    (SUCCESS_CHECK, "success_rate_ok", "empty", CheckOutcome.INCONCLUSIVE, "no request count for the canary"),
    (P99_CHECK, "p99_nan", "request_count", CheckOutcome.INCONCLUSIVE, "value: NaN"),
    (P99_CHECK, "p99_ok", "request_count", CheckOutcome.PASS, "48.7 <= max (250)"),
])
def test_judge_recorded_answers(metric: MetricCheck, value: str, requests: str, outcome: CheckOutcome,
                                reason: str) -> None:
    result = judge(metric, answer(value), None, answer(requests), 20)
    assert (result.outcome, result.reason) == (outcome, reason)


def test_scalar_and_odd_answers() -> None:
    assert answer("scalar") == 3.5
    assert answer("empty") is None
    assert math.isnan(answer("p99_nan") or 0.0)
    with pytest.raises(MetricQueryError, match="2 series"):
        answer("two_series")
    with pytest.raises(MetricQueryError):
        scalar_from_result([{"metric": {}, "value": [1.0, "abc"]}])
    with pytest.raises(MetricQueryError):
        scalar_from_result({"unexpected": True})
    assert scalar_from_result([{"metric": {}, "value": [1.0, "+Inf"]}]) == math.inf


# ---------------------------------------------------- the rendered PromQL, evaluated by Prometheus


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_templates_evaluate_as_intended_in_prometheus(tmp_path: Path) -> None:
    """`promtool test rules` evaluates the exact rendered queries over synthetic Envoy series."""

    def rq_xx(cluster: str, code_class: str, values: str) -> dict[str, str]:
        labels = f'envoy_cluster_name="{cluster}",envoy_response_code_class="{code_class}",instance="e1"'
        return {"series": f"envoy_cluster_upstream_rq_xx{{{labels}}}", "values": values}

    def bucket(cluster: str, le: str, values: str) -> dict[str, str]:
        return {"series": f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{cluster}",le="{le}"}}',
                "values": values}

    series = [
        rq_xx("ok", "2", "0+10x60"),  # no 5xx series at all: it appears only after the first 5xx
        rq_xx("dead", "5", "0+10x60"),  # connection failures: every request a 503, no 2xx series
        rq_xx("half", "2", "0+5x60"), rq_xx("half", "5", "0+5x60"),
        rq_xx("idle", "2", "7x60"),  # old traffic, none within the window
        # the first 5xx just happened: its series has a single sample, which increase() cannot use
        rq_xx("fresh", "2", "0+10x60"), rq_xx("fresh", "5", "_x59 5"),
        bucket("ok", "10", "0+9x60"), bucket("ok", "100", "0+10x60"), bucket("ok", "+Inf", "0+10x60"),
        bucket("dead", "10", "0x60"), bucket("dead", "+Inf", "0x60"),  # no latency samples
    ]

    def expect(query: str, value: float | None) -> dict[str, Any]:
        samples = [] if value is None else [{"labels": "{}", "value": value}]
        return {"expr": query, "eval_time": "60s", "exp_samples": samples}

    rate = "request-success-rate"
    tests = [
        expect(template_query(rate, "ok", 30), 100),
        expect(template_query(rate, "dead", 30), 0),
        expect(template_query(rate, "half", 30), 50),
        expect(template_query(rate, "fresh", 30), 100 * (1 - 5 / 305)),
        expect(request_count_query("fresh", 30), 305),
        expect(template_query(rate, "missing", 30), None),
        expect(request_count_query("half", 30), 300),
        expect(request_count_query("dead", 30), 300),
        expect(request_count_query("missing", 30), 0),
        expect(request_count_query("idle", 30), 0),
        expect(template_query("request-rate", "ok", 30), 10),
        expect(template_query("request-duration-p99", "missing", 30), None),
    ]
    # NaN never equals NaN, not even in promtool, so a NaN answer is asserted as "x != x holds".
    for nan_query in (template_query(rate, "idle", 30), template_query("request-duration-p99", "dead", 30)):
        tests.append(expect(f"vector(1) and on() (({nan_query}) != ({nan_query}))", 1))
    doc = {"evaluation_interval": "1s",
           "tests": [{"interval": "1s", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "templates_test.yml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
