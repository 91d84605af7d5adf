"""The Rollout schema: every accepted shape, and every rejection with the YAML path it names."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from aviary.policy.loader import parse_policy_text
from aviary.policy.schema import (
    Analysis,
    Endpoint,
    ListenerSpec,
    MetricCheck,
    Pause,
    PolicyError,
    PolicySet,
    Rollout,
    Strategy,
)

FULL: dict[str, Any] = {
    "apiVersion": "aviary.dev/v1",
    "kind": "Rollout",
    "metadata": {"name": "checkout"},
    "spec": {
        "listener": {"address": "0.0.0.0", "port": 10000},
        "hosts": ["checkout.example.com", "*.shop.example.com", "*"],
        "version": "v1",
        "endpoints": ["10.0.0.7:8080", "backend.internal:8080", "[::1]:9000"],
        "proxyCluster": "edge",
        "strategy": {"steps": [5, {"pause": {}}, 20, {"pause": {"duration": "5m"}}, 50], "interval": "30s"},
        "analysis": {
            "prometheus": "http://127.0.0.1:9090",
            "checkEvery": "5s",
            "window": "30s",
            "minRequests": 20,
            "failureLimit": 0,
            "inconclusiveLimit": 3,
            "onInconclusive": "rollback",
            "metrics": [
                {"name": "success", "template": "request-success-rate", "min": 99},
                {"name": "latency", "template": "request-duration-p99", "max": 500},
                {"name": "vs-stable", "template": "request-success-rate", "maxDecreaseFromStable": 1},
                {"name": "custom", "query": 'sum(rate(x{cluster="{{ canary }}"}[{{ window }}]))', "max": 5},
            ],
        },
    },
}


def parse(doc: dict[str, Any]) -> tuple[Rollout | None, list[PolicyError]]:
    return parse_policy_text(yaml.safe_dump(doc), "p.yaml")


def with_change(path: str, value: Any) -> dict[str, Any]:
    """Copy of FULL with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    doc = copy.deepcopy(FULL)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return doc


def test_full_example_parses() -> None:
    rollout, errors = parse(FULL)
    assert errors == []
    assert rollout is not None
    assert rollout.name == "checkout"
    spec = rollout.spec
    assert spec.listener.key == "0.0.0.0:10000"
    assert spec.endpoints[0] == Endpoint(host="10.0.0.7", port=8080)
    assert spec.endpoints[0].is_ip
    assert not spec.endpoints[1].is_ip
    assert spec.endpoints[2].host == "::1" and spec.endpoints[2].is_ip
    assert str(spec.endpoints[2]) == "[::1]:9000"
    assert spec.proxy_cluster == "edge"
    assert spec.strategy is not None
    assert spec.strategy.steps == (5, Pause(), 20, Pause(duration=300.0), 50)
    assert spec.strategy.weights == (5, 20, 50)
    assert spec.strategy.interval == 30.0
    assert spec.analysis is not None
    assert spec.analysis.check_every == 5.0
    assert spec.analysis.metrics[2].max_decrease_from_stable == 1.0


def test_minimal_defaults() -> None:
    doc = {
        "apiVersion": "aviary.dev/v1",
        "kind": "Rollout",
        "metadata": {"name": "a"},
        "spec": {"listener": {"port": 10000}, "hosts": ["*"], "version": "v1",
                 "endpoints": ["127.0.0.1:8081"]},
    }
    rollout, errors = parse(doc)
    assert errors == [] and rollout is not None
    assert rollout.spec.listener.address == "0.0.0.0"
    spec = rollout.spec
    assert spec.strategy is None and spec.analysis is None and spec.proxy_cluster is None


def test_analysis_defaults() -> None:
    analysis = Analysis.model_validate({"metrics": [{"name": "m", "template": "request-rate", "min": 1}]})
    assert (analysis.check_every, analysis.window, analysis.min_requests) == (5.0, 30.0, 20)
    limits = (analysis.failure_limit, analysis.inconclusive_limit, analysis.on_inconclusive)
    assert limits == (0, 3, "rollback")
    assert analysis.prometheus is None


def test_step_weight_is_normalised_into_steps() -> None:
    assert Strategy.model_validate({"stepWeight": 10, "maxWeight": 50}).steps == (10, 20, 30, 40, 50)
    assert Strategy.model_validate({"stepWeight": 20, "maxWeight": 50}).steps == (20, 40, 50)
    assert Strategy.model_validate({"stepWeight": 50, "maxWeight": 50, "interval": "1m"}).interval == 60.0


def test_models_are_frozen_and_comparable() -> None:
    first, _ = parse(FULL)
    second, _ = parse(FULL)
    assert first is not None and first == second
    with pytest.raises(ValidationError):
        first.kind = "Other"  # type: ignore[assignment]
    assert hash(first.spec.endpoints[0]) == hash(Endpoint(host="10.0.0.7", port=8080))


def test_python_callers_may_use_field_names() -> None:
    listener = ListenerSpec(port=80)
    assert listener.key == "0.0.0.0:80"
    metric = MetricCheck(name="m", template="request-rate", max_decrease_from_stable=2.0)
    assert metric.max_decrease_from_stable == 2.0
    assert Endpoint.model_validate("example.com:443") == Endpoint(host="example.com", port=443)


def test_listener_address_is_normalised() -> None:
    assert ListenerSpec.model_validate({"address": "0:0::0", "port": 1}).key == ":::1"


def test_yaml_rejects_snake_case_names() -> None:
    _, errors = parse(with_change("spec.analysis.check_every", "5s"))
    assert [(e.field, e.reason) for e in errors] == [
        ("spec.analysis.check_every", "unknown field 'check_every' (did you mean 'checkEvery'?)")
    ]


def test_policy_error_str() -> None:
    assert str(PolicyError("a.yaml", "spec.hosts[0]", "bad")) == "a.yaml: spec.hosts[0]: bad"


def test_policy_set_defaults() -> None:
    assert PolicySet() == PolicySet(rollouts={}, files={}, revision=None)


REJECTIONS: list[tuple[str, Any, str, str]] = [
    # (path to change, new value (... = delete), expected field, expected reason fragment)
    ("apiVersion", "aviary.dev/v2", "apiVersion", "'aviary.dev/v1'"),
    ("apiVersion", ..., "apiVersion", "required field is missing"),
    ("kind", "Canary", "kind", "'Rollout'"),
    ("extra", 1, "extra", "unknown field 'extra'"),
    ("metadata.name", "Checkout", "metadata.name", "lowercase"),
    ("metadata.name", "a" * 41, "metadata.name", "at most 40"),
    ("metadata.name", "-a", "metadata.name", "invalid name"),
    ("metadata.name", 5, "metadata.name", "valid string"),
    ("metadata.labels", {"a": "b"}, "metadata.labels", "unknown field"),
    ("spec.listener.port", 0, "spec.listener.port", "greater than or equal to 1"),
    ("spec.listener.port", 65536, "spec.listener.port", "less than or equal to 65535"),
    ("spec.listener.port", "80", "spec.listener.port", "valid integer"),
    ("spec.listener.port", ..., "spec.listener.port", "required field is missing"),
    ("spec.listener.address", "localhost", "spec.listener.address", "must be an IP address"),
    ("spec.listener", ..., "spec.listener", "required field is missing"),
    ("spec.hosts", [], "spec.hosts", "at least 1"),
    ("spec.hosts", ["a..com"], "spec.hosts[0]", "invalid host"),
    ("spec.hosts", ["ok.com", "a*.com"], "spec.hosts[1]", "wildcard"),
    ("spec.hosts", ["*.*.com"], "spec.hosts[0]", "wildcard"),
    ("spec.hosts", ["a.com:80"], "spec.hosts[0]", "invalid host"),
    ("spec.hosts", ["1.2.3.999"], "spec.hosts[0]", "invalid host"),
    ("spec.hosts", ["a.com", "b.com", "A.COM"], "spec.hosts[2]", "duplicate host 'A.COM' (also hosts[0])"),
    ("spec.version", "V1", "spec.version", "invalid version"),
    ("spec.version", "v" * 41, "spec.version", "at most 40"),
    ("spec.version", 1.1, "spec.version", "quote it"),
    ("spec.endpoints", [], "spec.endpoints", "at least 1"),
    ("spec.endpoints", ["a.com:80", "noport"], "spec.endpoints[1]", "expected 'host:port'"),
    ("spec.endpoints", ["a.com:http"], "spec.endpoints[0]", "port must be a number"),
    ("spec.endpoints", ["a.com:0"], "spec.endpoints[0]", "1 to 65535"),
    ("spec.endpoints", ["a.com:70000"], "spec.endpoints[0]", "1 to 65535"),
    ("spec.endpoints", ["::1:80"], "spec.endpoints[0]", "IPv6 needs brackets"),
    ("spec.endpoints", ["[nothex]:80"], "spec.endpoints[0]", "only for IPv6"),
    ("spec.endpoints", ["[::g]:80"], "spec.endpoints[0]", "invalid endpoint host"),
    ("spec.endpoints", ["bad_host:80"], "spec.endpoints[0]", "invalid endpoint host"),
    ("spec.endpoints", [8080], "spec.endpoints[0]", "expected 'host:port'"),
    ("spec.endpoints", ["a.com:80", "a.com:80"], "spec.endpoints[1]", "duplicate endpoint 'a.com:80'"),
    ("spec.proxyCluster", "has space", "spec.proxyCluster", "invalid name"),
    ("spec.strategy.steps", [], "spec.strategy.steps", "at least one weight step"),
    ("spec.strategy.steps", [{"pause": {}}], "spec.strategy.steps", "at least one weight step"),
    ("spec.strategy.steps", [0], "spec.strategy.steps[0]", "between 1 and 99"),
    ("spec.strategy.steps", [5, 120], "spec.strategy.steps[1]", "between 1 and 99"),
    ("spec.strategy.steps", [5, True], "spec.strategy.steps[1]", "expected a weight"),
    ("spec.strategy.steps", [5, 20, 20], "spec.strategy.steps[2]", "must exceed the previous weight (20)"),
    ("spec.strategy.steps", [50, {"pause": {}}, 10], "spec.strategy.steps[2]", "previous weight (50)"),
    ("spec.strategy.steps", [5, "10"], "spec.strategy.steps[1]", "expected a weight"),
    ("spec.strategy.steps", [5, {"wait": {}}], "spec.strategy.steps[1]", "expected a weight"),
    ("spec.strategy.steps", [5, {"pause": 3}], "spec.strategy.steps[1].pause", "expected {}"),
    ("spec.strategy.steps", [5, {"pause": {"for": "1m"}}], "spec.strategy.steps[1].pause.for",
     "unknown field"),
    ("spec.strategy.steps", [5, {"pause": {"duration": "5"}}], "spec.strategy.steps[1].pause.duration",
     "invalid duration"),
    ("spec.strategy.steps", ..., "spec.strategy.steps", "give steps, or stepWeight and maxWeight"),
    ("spec.strategy.interval", "0s", "spec.strategy.interval", "greater than zero"),
    ("spec.strategy.interval", "soon", "spec.strategy.interval", "invalid duration"),
    ("spec.strategy.stepWeight", 10, "spec.strategy", "not both"),
    ("spec.strategy", {"stepWeight": 10}, "spec.strategy.maxWeight", "must be given together"),
    ("spec.strategy", {"maxWeight": 10}, "spec.strategy.stepWeight", "must be given together"),
    ("spec.strategy", {"stepWeight": 0, "maxWeight": 10}, "spec.strategy.stepWeight", "between 1 and 99"),
    ("spec.strategy", {"stepWeight": 10, "maxWeight": 100}, "spec.strategy.maxWeight", "between 1 and 99"),
    ("spec.strategy", {"stepWeight": 60, "maxWeight": 50}, "spec.strategy.stepWeight", "must not exceed"),
    ("spec.analysis.prometheus", "127.0.0.1:9090", "spec.analysis.prometheus", "http(s) URL"),
    ("spec.analysis.prometheus", "ftp://x", "spec.analysis.prometheus", "http(s) URL"),
    ("spec.analysis.checkEvery", "-1s", "spec.analysis.checkEvery", "invalid duration"),
    ("spec.analysis.window", 0, "spec.analysis.window", "greater than zero"),
    ("spec.analysis.minRequests", -1, "spec.analysis.minRequests", "greater than or equal to 0"),
    ("spec.analysis.failureLimit", 1.5, "spec.analysis.failureLimit", "valid integer"),
    ("spec.analysis.inconclusiveLimit", "3", "spec.analysis.inconclusiveLimit", "valid integer"),
    ("spec.analysis.onInconclusive", "ignore", "spec.analysis.onInconclusive", "'rollback' or 'pause'"),
    ("spec.analysis.metrics", [], "spec.analysis.metrics", "at least 1"),
    ("spec.analysis.metrics", ..., "spec.analysis.metrics", "needs checks: at least 1 in metrics, or a judge"),
    ("spec.analysis.metrics.1.name", "success", "spec.analysis.metrics[1].name",
     "duplicate metric name 'success' (also metrics[0])"),
    ("spec.analysis.metrics.0.name", "", "spec.analysis.metrics[0].name", "at least 1 character"),
    ("spec.analysis.metrics.0.name", "has space", "spec.analysis.metrics[0].name", "match pattern"),
    ("spec.analysis.metrics.0.template", "error-rate", "spec.analysis.metrics[0].template", "request-rate"),
    ("spec.analysis.metrics.0.query", "up", "spec.analysis.metrics[0]", "exactly one of template or query"),
    ("spec.analysis.metrics.3.query", ..., "spec.analysis.metrics[3]", "exactly one of template or query"),
    ("spec.analysis.metrics.3.query", "", "spec.analysis.metrics[3].query", "at least 1 character"),
    ("spec.analysis.metrics.0.min", ..., "spec.analysis.metrics[0]", "needs a threshold"),
    ("spec.analysis.metrics.0.min", "99", "spec.analysis.metrics[0].min", "valid number"),
    ("spec.analysis.metrics.0.min", float("nan"), "spec.analysis.metrics[0].min", "finite"),
    ("spec.analysis.metrics.1.min", 600, "spec.analysis.metrics[1].min", "greater than max"),
    ("spec.analysis.metrics.2.maxDecreaseFromStable", -1, "spec.analysis.metrics[2].maxDecreaseFromStable",
     "greater than or equal to 0"),
    ("spec.analysis.metrics.3.maxDecreaseFromStable", 1, "spec.analysis.metrics[3].maxDecreaseFromStable",
     "only works with a template"),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"), REJECTIONS, ids=[f"{r[0]}={r[1]!r}" for r in REJECTIONS]
)
def test_rejection(path: str, value: Any, field: str, reason: str) -> None:
    rollout, errors = parse(with_change(path, value))
    assert rollout is None
    assert [e.field for e in errors] == [field], errors
    assert reason in errors[0].reason
    assert errors[0].file == "p.yaml"


def test_all_problems_are_reported_at_once() -> None:
    doc = with_change("spec.listener.port", 0)
    doc["spec"]["version"] = "BAD"
    doc["metadata"]["name"] = "BAD"
    _, errors = parse(doc)
    assert sorted(e.field for e in errors) == ["metadata.name", "spec.listener.port", "spec.version"]


@pytest.mark.parametrize(
    ("endpoint", "fix"),
    [("http://10.0.0.8:8080", "drop the scheme 'http://', write '10.0.0.8:8080'"),
     ("https://api.internal:443/", "drop the scheme 'https://', write 'api.internal:443'")],
)
def test_an_endpoint_with_a_scheme_says_to_drop_it(endpoint: str, fix: str) -> None:
    _, errors = parse(with_change("spec.endpoints", [endpoint]))
    assert len(errors) == 1 and errors[0].field == "spec.endpoints[0]", errors
    assert fix in errors[0].reason and "IPv6" not in errors[0].reason


def test_a_last_step_of_100_says_promotion_follows_the_last_step() -> None:
    _, errors = parse(with_change("spec.strategy.steps", [10, 50, 100]))
    assert [(e.field, e.reason) for e in errors] == [
        ("spec.strategy.steps[2]", "100 is not a step: promotion to 100 % follows the last step, so remove it")
    ]
