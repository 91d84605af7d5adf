"""The web provider against a local HTTP server (127.0.0.1, kernel-picked port), and its JSONPath subset."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aviary.metrics.checks import run_checks
from aviary.metrics.jsonpath import JsonPathError, evaluate, parse
from aviary.metrics.kinds import PROMETHEUS, WEB
from aviary.metrics.provider import MetricProviderError, MetricQueryError
from aviary.metrics.templates import Side
from aviary.metrics.web import WebProvider, split_query
from aviary.policy.analysis import CheckOutcome
from aviary.policy.schema import Analysis
from tests.rig.json_server import JsonServer, Page
from tests.rig.ports import free_port


@pytest.fixture
def web() -> Iterator[JsonServer]:
    with JsonServer() as server:
        yield server


@pytest.fixture
async def provider() -> Any:
    web = WebProvider(timeout=2)
    yield web
    web.close()


# --------------------------------------------------------------------------------------- provider


async def test_one_number(web: JsonServer, provider: WebProvider) -> None:
    web.json("/stats?version=v2", {"data": {"orders": {"rate": 4.5}}})
    assert await provider.query_scalar(f"{web.url}/stats?version=v2#$.data.orders.rate", 2) == 4.5
    assert web.asked == ["/stats?version=v2"]  # the fragment stays on this side


async def test_numbers_as_strings_null_and_nothing(web: JsonServer, provider: WebProvider) -> None:
    web.json("/s", {"a": "12.5", "b": None, "c": True, "list": [1, 2]})
    assert await provider.query_scalar(f"{web.url}/s#$.a", 2) == 12.5
    assert await provider.query_scalar(f"{web.url}/s#$.b", 2) is None
    assert await provider.query_scalar(f"{web.url}/s#$.missing", 2) is None
    assert await provider.query_scalar(f"{web.url}/s#$.c", 2) == 1.0
    assert await provider.query_scalar(f"{web.url}/s#$.list[-1]", 2) == 2.0
    with pytest.raises(MetricQueryError, match=r"selected 2 values, expected one"):
        await provider.query_scalar(f"{web.url}/s#$.list[*]", 2)
    with pytest.raises(MetricQueryError, match=r"selected \[1, 2\], not a number"):
        await provider.query_scalar(f"{web.url}/s#$.list", 2)


async def test_series(web: JsonServer, provider: WebProvider) -> None:
    web.json("/s", {"latencies": [10, 12.5, None], "groups": [{"v": 1}, {"v": 2}]})
    samples = await provider.query_series(f"{web.url}/s#$.latencies", 30, 1, 2)
    assert samples[:2] == (10.0, 12.5) and math.isnan(samples[2])
    assert await provider.query_series(f"{web.url}/s#$.groups[*].v", 30, 1, 2) == (1.0, 2.0)
    assert await provider.query_series(f"{web.url}/s#$.none", 30, 1, 2) == ()


async def test_http_error_names_url_status_and_body(web: JsonServer, provider: WebProvider) -> None:
    web.pages["/s"] = Page(status=503, body=b"down for maintenance", content_type="text/plain")
    with pytest.raises(MetricProviderError) as raised:
        await provider.query_scalar(f"{web.url}/s#$.a", 2)
    assert str(raised.value) == f"web GET {web.url}/s answered HTTP 503: down for maintenance"


async def test_not_json(web: JsonServer, provider: WebProvider) -> None:
    web.pages["/s"] = Page(body=b"<html>login</html>", content_type="text/html")
    with pytest.raises(MetricQueryError, match="not JSON"):
        await provider.query_scalar(f"{web.url}/s#$.a", 2)


async def test_unreachable(provider: WebProvider) -> None:
    url = f"http://127.0.0.1:{free_port()}/s"
    with pytest.raises(MetricProviderError) as raised:
        await provider.query_scalar(f"{url}#$.a", 2)
    assert str(raised.value) == f"web GET {url} unreachable: connection refused"


async def test_slow_answer_times_out_and_is_not_sent_again_while_it_hangs(web: JsonServer) -> None:
    web.json("/slow", {"a": 1}, delay=2.0)
    provider = WebProvider(timeout=5)
    try:
        started = time.monotonic()
        with pytest.raises(MetricProviderError, match=r"timed out after 0\.3s$"):
            await provider.query_scalar(f"{web.url}/slow#$.a", 0.3)
        assert time.monotonic() - started < 1.5  # generous bound: it does not wait for the answer
        if provider.in_flight:  # its thread may still be waiting for the server
            with pytest.raises(MetricProviderError, match="has not answered the same query"):
                await provider.query_scalar(f"{web.url}/slow#$.a", 0.3)
    finally:
        provider.close()


async def test_a_web_check_drives_a_round(web: JsonServer, provider: WebProvider) -> None:
    """A failing web value fails the round; an error is inconclusive with the provider's message."""
    from tests.unit.test_check_kinds import Scripted

    analysis = Analysis.model_validate({"minRequests": 0, "metrics": [
        {"name": "orders", "web": {"url": web.url + "/orders/{{ canary_version }}", "jsonPath": "$.perRequest"},
         "compare": {"by": "ratio", "min": 0.9}}]})
    web.json("/orders/v2", {"perRequest": 0.5})
    web.json("/orders/v1", {"perRequest": 1.0})
    prometheus = Scripted({})
    canary, stable = Side("shop_v2", "v2", 10), Side("shop_v1", "v1", 90)
    (result,) = await run_checks({PROMETHEUS: prometheus, WEB: provider}, analysis, canary, stable)
    assert (result.kind, result.outcome, result.reason) == (
        "compare", CheckOutcome.FAIL, "canary 0.5 / stable 1 = 0.5 < min (0.9)")
    assert result.queries == (f"{web.url}/orders/v2#$.perRequest", f"{web.url}/orders/v1#$.perRequest")
    web.pages["/orders/v1"] = Page(status=500, body=b"boom", content_type="text/plain")
    (result,) = await run_checks({PROMETHEUS: prometheus, WEB: provider}, analysis, canary, stable)
    assert (result.outcome, result.reason) == (
        CheckOutcome.INCONCLUSIVE, f"web GET {web.url}/orders/v1 answered HTTP 500: boom")


def test_split_query() -> None:
    assert split_query("http://x/y?z=1#$.a.b") == ("http://x/y?z=1", "$.a.b")
    assert split_query("http://x/y") == ("http://x/y", "$")


# --------------------------------------------------------------------------------------- JSONPath


@pytest.mark.parametrize(("path", "expected"), [
    ("$", [{"a": {"b": [1, 2, 3], "c-d": 4}}]),
    ("$.a.b", [[1, 2, 3]]),
    ("$.a.b[0]", [1]),
    ("$.a.b[-1]", [3]),
    ("$.a.b[7]", []),
    ("$.a.b[*]", [1, 2, 3]),
    ("$.a.*", [[1, 2, 3], 4]),
    ("$['a']['c-d']", [4]),
    ('$["a"].b[1]', [2]),
    ("{$.a.c-d}", [4]),
    ("$.nothing.here", []),
])
def test_json_path_subset(path: str, expected: list[Any]) -> None:
    assert evaluate(path, {"a": {"b": [1, 2, 3], "c-d": 4}}) == expected


@pytest.mark.parametrize("path", ["a.b", "$..a", "$.a[?(@.b > 1)]", "$.a[0:2]", "$.a b"])
def test_unsupported_json_paths_are_refused(path: str) -> None:
    with pytest.raises(JsonPathError):
        parse(path)
