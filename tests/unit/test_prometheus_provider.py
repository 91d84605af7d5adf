"""PrometheusProvider and run_checks against a tiny local server that answers like /api/v1/query."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aviary.metrics.checks import run_checks
from aviary.metrics.prometheus import PrometheusProvider
from aviary.metrics.provider import MetricProvider, MetricProviderError, MetricQueryError
from aviary.metrics.templates import render, request_count_query, template_query
from aviary.policy.analysis import CheckOutcome
from aviary.policy.schema import Analysis
from tests.rig import fake_prometheus
from tests.rig.fake_prometheus import Answer, vector_body
from tests.rig.ports import free_port

DATA = Path(__file__).parent / "data"


def fixture_body(name: str) -> bytes:
    return (DATA / f"prom_{name}.json").read_bytes()


class FakePrometheus(fake_prometheus.FakePrometheus):
    """Answers GET /api/v1/query from ``answers`` (query -> Answer); unknown queries get an empty vector."""

    def answer(self, query: str, name: str | None = None, *, value: str | None = None, **kwargs: Any) -> None:
        """Answer ``query`` with the fixture file ``prom_<name>.json``, or with one sample of ``value``."""
        body = vector_body(value) if value is not None else fixture_body(name or "empty")
        self.answers[query] = Answer(body=body, **kwargs)


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    with FakePrometheus(default=Answer(body=fixture_body("empty"))) as fake:
        yield fake


# -------------------------------------------------------------------------------------- provider


async def test_vector_answer(prometheus: FakePrometheus) -> None:
    prometheus.answer("up", "success_rate_ok")
    provider: MetricProvider = PrometheusProvider(prometheus.url, timeout=2)
    assert await provider.query_scalar("up", 2.0) == pytest.approx(99.83333333333333)
    assert prometheus.queries == ["up"]


async def test_empty_answer_is_none_and_nan_is_nan(prometheus: FakePrometheus) -> None:
    prometheus.answer("nan", "p99_nan")
    provider = PrometheusProvider(prometheus.url + "/", timeout=2)
    assert await provider.query_scalar("nothing") is None
    value = await provider.query_scalar("nan")
    assert value is not None and math.isnan(value)


async def test_scalar_answer(prometheus: FakePrometheus) -> None:
    prometheus.answer("scalar(vector(3.5))", "scalar")
    assert await PrometheusProvider(prometheus.url).query_scalar("scalar(vector(3.5))") == 3.5


async def test_query_is_url_encoded(prometheus: FakePrometheus) -> None:
    query = request_count_query("shop-v2", 30)
    prometheus.answer(query, "request_count")
    assert await PrometheusProvider(prometheus.url).query_scalar(query) == pytest.approx(480)
    assert prometheus.queries == [query]


async def test_several_series_is_a_query_error(prometheus: FakePrometheus) -> None:
    prometheus.answer("up", "two_series")
    with pytest.raises(MetricQueryError, match="2 series"):
        await PrometheusProvider(prometheus.url).query_scalar("up")


async def test_bad_query_answer_is_a_provider_error(prometheus: FakePrometheus) -> None:
    prometheus.answers["sum("] = Answer(status=400, body=fixture_body("error_bad_data"))
    with pytest.raises(MetricProviderError, match=r"400.*parse error") as caught:
        await PrometheusProvider(prometheus.url).query_scalar("sum(")
    assert caught.value.__cause__ is not None


async def test_server_error_fails_fast_without_retries(prometheus: FakePrometheus) -> None:
    prometheus.answers["up"] = Answer(status=503, body=b"Service Unavailable", content_type="text/plain")
    started = time.monotonic()
    with pytest.raises(MetricProviderError, match="503"):
        await PrometheusProvider(prometheus.url, timeout=2).query_scalar("up")
    assert time.monotonic() - started < 1.0
    assert prometheus.queries == ["up"]  # asked once


async def test_malformed_answer_is_a_provider_error(prometheus: FakePrometheus) -> None:
    prometheus.answers["up"] = Answer(body=b"<html>proxy login</html>", content_type="text/html")
    with pytest.raises(MetricProviderError, match="malformed"):
        await PrometheusProvider(prometheus.url).query_scalar("up")


async def test_unreachable_is_a_provider_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(MetricProviderError) as raised:
        await PrometheusProvider(url, timeout=2).query_scalar("up")
    assert time.monotonic() - started < 1.5
    assert str(raised.value) == f"Prometheus {url} unreachable: connection refused"


async def test_slow_answer_times_out(prometheus: FakePrometheus) -> None:
    prometheus.answer("up", "success_rate_ok", delay=3.0)
    started = time.monotonic()
    with pytest.raises(MetricProviderError) as raised:
        await PrometheusProvider(prometheus.url, timeout=0.3).query_scalar("up")
    assert time.monotonic() - started < 2.0
    assert str(raised.value) == f"Prometheus {prometheus.url} timed out after 0.3s"


async def test_the_callers_timeout_applies_below_the_providers(prometheus: FakePrometheus) -> None:
    prometheus.answer("up", "success_rate_ok", delay=3.0)
    provider = PrometheusProvider(prometheus.url, timeout=5)
    started = time.monotonic()
    with pytest.raises(MetricProviderError, match=r"timed out after 0\.4s$"):
        await provider.query_scalar("up", 0.4)
    assert time.monotonic() - started < 1.0
    with pytest.raises(MetricProviderError, match=r"timed out after 0\.3s$"):  # its own limit is lower
        await PrometheusProvider(prometheus.url, timeout=0.3).query_scalar("up", 4.0)


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrometheusProvider("http://127.0.0.1:9090", timeout=0)


# ------------------------------------------------------------------------------------ run_checks

ANALYSIS = Analysis.model_validate({
    "window": "30s", "minRequests": 20,
    "metrics": [
        {"name": "success", "template": "request-success-rate", "min": 99, "maxDecreaseFromStable": 0.5},
        {"name": "p99", "template": "request-duration-p99", "max": 250},
        {"name": "errors", "query": 'sum(rate(app_errors{cluster="{{ canary }}"}[{{ window }}]))', "max": 1},
    ],
})
CANARY, STABLE = "shop-v2", "shop-v1"


def queries() -> dict[str, str]:
    return {
        "count": request_count_query(CANARY, 30),
        "success": render(ANALYSIS.metrics[0], CANARY, STABLE, 30),
        "stable-success": template_query("request-success-rate", STABLE, 30),
        "p99": render(ANALYSIS.metrics[1], CANARY, STABLE, 30),
        "errors": 'sum(rate(app_errors{cluster="shop-v2"}[30s]))',
    }


async def test_run_checks_queries_and_judges_every_metric(prometheus: FakePrometheus) -> None:
    q = queries()
    prometheus.answer(q["count"], "request_count")
    prometheus.answer(q["success"], "success_rate_ok")
    prometheus.answer(q["stable-success"], value="99.9")
    prometheus.answer(q["p99"], "p99_nan")
    prometheus.answer(q["errors"], value="0.2")
    results = await run_checks(PrometheusProvider(prometheus.url), ANALYSIS, CANARY, STABLE)
    assert [(r.name, r.outcome) for r in results] == [
        ("success", CheckOutcome.PASS), ("p99", CheckOutcome.INCONCLUSIVE), ("errors", CheckOutcome.PASS)]
    assert results[0].stable_value == pytest.approx(99.9)
    assert results[1].reason == "value: NaN"
    assert sorted(prometheus.queries) == sorted(q.values())


async def test_run_checks_fails_on_a_drop_from_stable(prometheus: FakePrometheus) -> None:
    q = queries()
    prometheus.answer(q["count"], "request_count")
    prometheus.answer(q["success"], value="99.2")
    prometheus.answer(q["stable-success"], value="100")
    results = await run_checks(PrometheusProvider(prometheus.url), ANALYSIS, CANARY, STABLE)
    assert results[0].outcome is CheckOutcome.FAIL
    assert results[0].reason == "decrease from stable 100 is 0.8 > maxDecreaseFromStable (0.5)"


async def test_run_checks_with_too_little_traffic(prometheus: FakePrometheus) -> None:
    q = queries()
    prometheus.answer(q["count"], "request_count_low")
    prometheus.answer(q["success"], "success_rate_all_failing")
    results = await run_checks(PrometheusProvider(prometheus.url), ANALYSIS, CANARY, STABLE)
    assert {r.outcome for r in results} == {CheckOutcome.INCONCLUSIVE}
    assert results[0].reason == "canary requests (12) < minRequests (20)"


async def test_run_checks_when_prometheus_is_down() -> None:
    provider = PrometheusProvider(f"http://127.0.0.1:{free_port()}", timeout=1)
    results = await run_checks(provider, ANALYSIS, CANARY, STABLE)
    assert len(results) == 3
    assert all(r.outcome is CheckOutcome.INCONCLUSIVE for r in results)
    assert {r.reason for r in results} == {f"request count: {provider!r} unreachable: connection refused"}
    assert repr(provider).startswith("Prometheus http://127.0.0.1:")


async def test_run_checks_when_one_query_errors(prometheus: FakePrometheus) -> None:
    q = queries()
    prometheus.answer(q["count"], "request_count")
    prometheus.answer(q["success"], "success_rate_failing")
    prometheus.answer(q["stable-success"], value="99.9")
    prometheus.answers[q["errors"]] = Answer(status=422, body=fixture_body("error_bad_data"))
    results = await run_checks(PrometheusProvider(prometheus.url), ANALYSIS, CANARY, STABLE)
    assert [r.outcome for r in results] == [CheckOutcome.FAIL, CheckOutcome.INCONCLUSIVE, CheckOutcome.INCONCLUSIVE]
    assert "422" in results[2].reason


@dataclass
class ScriptedProvider:
    """An in-memory MetricProvider: query -> value, or an exception to raise."""

    values: dict[str, float | Exception | None]

    async def query_scalar(self, promql: str, timeout: float) -> float | None:
        value = self.values.get(promql)
        if isinstance(value, Exception):
            raise value
        return value


async def test_run_checks_with_an_in_memory_provider() -> None:
    q = queries()
    provider = ScriptedProvider({q["count"]: 500.0, q["success"]: 100.0, q["stable-success"]: 100.0,
                                 q["p99"]: 12.0, q["errors"]: MetricQueryError("query returned 2 series")})
    results = await run_checks(provider, ANALYSIS, CANARY, STABLE)
    assert [r.outcome for r in results] == [CheckOutcome.PASS, CheckOutcome.PASS, CheckOutcome.INCONCLUSIVE]
    assert results[2].reason == "query returned 2 series"


async def test_run_checks_with_an_unknown_placeholder_is_inconclusive() -> None:
    analysis = Analysis.model_validate({"metrics": [{"name": "x", "query": "up{a='{{ nope }}'}", "max": 1}]})
    results = await run_checks(ScriptedProvider({request_count_query(CANARY, 30): 100.0}), analysis, CANARY, STABLE)
    assert results[0].outcome is CheckOutcome.INCONCLUSIVE
    assert "unknown placeholder" in results[0].reason


# ------------------------------------------------------------------- Prometheus' words, range queries


async def test_an_error_answer_quotes_prometheus_own_message(prometheus: FakePrometheus) -> None:
    prometheus.answers["sum("] = Answer(status=400, body=fixture_body("error_bad_data"))
    with pytest.raises(MetricProviderError) as raised:
        await PrometheusProvider(prometheus.url).query_scalar("sum(")
    assert str(raised.value) == (f"Prometheus {prometheus.url} answered HTTP 400 (bad_data): "
                                 'invalid parameter "query": 1:5: parse error: unexpected end of input')


async def test_a_plain_text_error_answer_is_quoted(prometheus: FakePrometheus) -> None:
    prometheus.answers["up"] = Answer(status=503, body=b"Service Unavailable\n", content_type="text/plain")
    with pytest.raises(MetricProviderError) as raised:
        await PrometheusProvider(prometheus.url).query_scalar("up")
    assert str(raised.value) == f"Prometheus {prometheus.url} answered HTTP 503: Service Unavailable"


def matrix_body(*values: str) -> bytes:
    samples = [[1767225600 + index, value] for index, value in enumerate(values)]
    return json.dumps({"status": "success",
                       "data": {"resultType": "matrix", "result": [{"metric": {}, "values": samples}]}}).encode()


async def test_query_series_is_a_range_query_at_the_step(prometheus: FakePrometheus) -> None:
    prometheus.answers["p"] = Answer(body=matrix_body("1", "2.5", "NaN"))
    samples = await PrometheusProvider(prometheus.url).query_series("p", 30, 1, 2)
    assert samples[:2] == (1.0, 2.5) and math.isnan(samples[2])
    (asked,) = prometheus.ranges
    assert asked["step"] == "1" and float(asked["end"]) - float(asked["start"]) == pytest.approx(30, abs=1)
    prometheus.answers["none"] = Answer(body=json.dumps(
        {"status": "success", "data": {"resultType": "matrix", "result": []}}).encode())
    assert await PrometheusProvider(prometheus.url).query_series("none", 30, 1, 2) == ()


async def test_query_series_of_several_series_is_a_query_error(prometheus: FakePrometheus) -> None:
    body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"a": "1"}, "values": [[1, "1"]]}, {"metric": {"a": "2"}, "values": [[1, "1"]]}]}}).encode()
    prometheus.answers["two"] = Answer(body=body)
    with pytest.raises(MetricQueryError, match="2 series"):
        await PrometheusProvider(prometheus.url).query_series("two", 30, 1, 2)
