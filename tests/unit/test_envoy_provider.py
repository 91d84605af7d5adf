"""``analysis.provider: envoy``: its spelling, the asks the check kinds plan for it, and the
provider's answers from the reports store (``aviary.metrics.envoy``)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from aviary.metrics.checks import run_checks
from aviary.metrics.envoy import REPORT_GRACE, EnvoyProvider
from aviary.metrics.envoy_query import EnvoyQuery, parse
from aviary.metrics.envoy_reports import EnvoyReports
from aviary.metrics.kinds import ENVOY, RoundContext, checks_of, request_count_ask
from aviary.metrics.provider import MetricProviderError
from aviary.metrics.templates import Side
from aviary.policy.analysis import CheckOutcome
from aviary.policy.loader import parse_policy_text
from aviary.policy.schema import Analysis, Rollout
from aviary.policy.server_rules import needs_prometheus
from tests.rig.policies import rollout_doc
from tests.unit.test_envoy_reports import Clock

CANARY = Side("shop-v2", "v2", 10)
STABLE = Side("shop-v1", "v1", 90)


def envoy_analysis(*metrics: dict[str, Any], **kwargs: Any) -> Analysis:
    return Analysis.model_validate({"provider": "envoy", "window": "10s", "checkEvery": "500ms", "minRequests": 20,
                                    "metrics": list(metrics), **kwargs})


def test_the_default_provider_is_prometheus() -> None:
    assert Analysis.model_validate({"metrics": [{"name": "s", "template": "request-success-rate", "min": 99}]
                                    }).provider == "prometheus"


@pytest.mark.parametrize(("analysis", "field", "reason"), [
    ({"metrics": [{"name": "q", "query": "sum(up)", "min": 1}]}, "spec.analysis.metrics[0].query",
     "custom PromQL query needs provider: prometheus"),
    ({"metrics": [{"name": "cpu", "template": "version-cpu", "max": 1}], "versionLabel": "version"},
     "spec.analysis.metrics[0].template", "version-cpu reads the application's metrics from Prometheus"),
    ({"judge": {"metrics": [{"name": "q", "query": "sum(x{c='{{ canary }}'})"}]}},
     "spec.analysis.judge.metrics[0].query", "custom PromQL query"),
    ({"provider": "graphite", "metrics": [{"name": "s", "template": "request-success-rate", "min": 99}]},
     "spec.analysis.provider", "prometheus"),
])
def test_what_the_envoy_provider_cannot_answer_is_refused(analysis: dict[str, Any], field: str,
                                                          reason: str) -> None:
    doc = rollout_doc()
    doc["spec"]["analysis"] = {"provider": "envoy", **analysis}
    rollout, errors = parse_policy_text(yaml.safe_dump(doc), "p.yaml")
    assert rollout is None
    assert [(e.file, e.field) for e in errors] == [("p.yaml", field)], errors
    assert reason in errors[0].reason, errors


def test_a_window_longer_than_the_reports_kept_is_refused() -> None:
    with pytest.raises(ValidationError, match="keeps 900s of reports"):
        envoy_analysis({"name": "s", "template": "request-success-rate", "min": 99}, window="1h")


def test_the_envoy_provider_needs_no_prometheus() -> None:
    doc = rollout_doc()
    doc["spec"]["analysis"] = {"provider": "envoy", "metrics": [
        {"name": "s", "template": "request-success-rate", "min": 99}]}
    assert needs_prometheus(Rollout.model_validate(doc), "f.yaml", None) is None


def test_checks_plan_envoy_queries_for_every_template_and_the_judge() -> None:
    analysis = envoy_analysis(
        {"name": "success", "template": "request-success-rate", "min": 99},
        {"name": "p99", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}},
        judge={"step": "1s", "minSamples": 5, "metrics": [{"name": "latency", "template": "request-duration-p50"}]})
    context = RoundContext(analysis, CANARY, STABLE, since=30.0)
    asks = [ask for check in checks_of(analysis) for ask in check.plan(context)]
    assert {ask.source for ask in asks} == {ENVOY}
    assert [ask.query for ask in asks] == [
        'request-success-rate{cluster="shop-v2"}[10s]',
        'request-duration-p99{cluster="shop-v2"}[10s]', 'request-duration-p99{cluster="shop-v1"}[10s]',
        'request-duration-p50{cluster="shop-v2"}[1s]', 'request-duration-p50{cluster="shop-v1"}[1s]']
    assert (asks[-1].window, asks[-1].step) == (30.0, 1.0)
    assert request_count_ask(analysis, "shop-v2").query == 'request-count{cluster="shop-v2"}[10s]'
    assert parse(EnvoyQuery.of("request-rate-per-weight", CANARY, 10).text()) == EnvoyQuery(
        "request-rate-per-weight", "shop-v2", 10.0, 10)


def _store(clock: Clock) -> EnvoyReports:
    store = EnvoyReports(clock)
    store.add_counters("envoy-1", "edge", [("shop-v2", 2, 70), ("shop-v2", 5, 30), ("shop-v1", 2, 900)])
    store.add_counters("envoy-2", "edge", [("shop-v2", 2, 0), ("shop-v1", 4, 100)])
    store.add_samples("envoy-1", "edge", [("shop-v2", 45.0, 200)] * 50 + [("shop-v1", 30.0, 200)] * 50)
    return store


def _ask(provider: EnvoyProvider, query: str) -> float | None:
    return asyncio.run(provider.query_scalar(query, 1.0))


def test_the_provider_answers_each_template_summed_over_proxies() -> None:
    clock = Clock()
    provider = EnvoyProvider(_store(clock))
    assert _ask(provider, 'request-success-rate{cluster="shop-v2"}[10s]') == pytest.approx(70.0)
    assert _ask(provider, 'error-rate-5xx{cluster="shop-v2"}[10s]') == pytest.approx(30.0)
    assert _ask(provider, 'error-rate-4xx{cluster="shop-v1"}[10s]') == pytest.approx(10.0)
    assert _ask(provider, 'request-count{cluster="shop-v1"}[10s]') == 1000
    assert _ask(provider, 'request-rate{cluster="shop-v1"}[10s]') == pytest.approx(100.0)
    assert _ask(provider, 'request-rate-per-weight{cluster="shop-v1",weight="90"}[10s]') == pytest.approx(100 / 90)
    assert _ask(provider, 'request-duration-p99{cluster="shop-v2"}[10s]') == 45.0
    assert _ask(provider, 'request-duration-p50{cluster="shop-v1"}[10s]') == 30.0
    no_traffic = _ask(provider, 'request-success-rate{cluster="shop-v3"}[10s]')
    assert no_traffic is not None and math.isnan(no_traffic)
    clock.now += 11  # everything is older than the window now
    assert _ask(provider, 'request-count{cluster="shop-v1"}[10s]') == 0


def test_series_are_one_value_per_step() -> None:
    clock = Clock()
    store = EnvoyReports(clock)
    for second in range(10):
        clock.now += 1
        store.add_samples("envoy-1", "edge", [("shop-v2", 40.0 + second, 200)] * 3)
    provider = EnvoyProvider(store)
    series = asyncio.run(provider.query_series('request-duration-p50{cluster="shop-v2"}[1s]', 5, 1, 1.0))
    assert series == (45.0, 46.0, 47.0, 48.0, 49.0)


def test_a_serving_proxy_that_does_not_report_makes_the_checks_inconclusive() -> None:
    clock = Clock()
    store = _store(clock)
    expected = [("envoy-1", clock.now - 60), ("envoy-3", clock.now - 60), ("envoy-4", clock.now - 1)]
    provider = EnvoyProvider(store, lambda: expected)
    with pytest.raises(MetricProviderError, match=r"1 serving proxy not reporting \(envoy-3\).*metrics_service"):
        _ask(provider, 'request-count{cluster="shop-v2"}[10s]')
    analysis = envoy_analysis({"name": "success", "template": "request-success-rate", "min": 99})
    results = asyncio.run(run_checks({ENVOY: provider}, analysis, CANARY, STABLE))
    [result] = results
    assert result.outcome is CheckOutcome.INCONCLUSIVE and "envoy-3" in result.reason
    clock.now += REPORT_GRACE + 1  # envoy-1 has gone silent too; envoy-4 is now expected
    with pytest.raises(MetricProviderError, match=r"3 serving proxies not reporting \(envoy-1, envoy-3, envoy-4\)"):
        _ask(provider, 'request-count{cluster="shop-v2"}[10s]')


def test_a_round_on_envoy_reports_fails_a_bad_canary() -> None:
    clock = Clock()
    provider = EnvoyProvider(_store(clock), lambda: [("envoy-1", clock.now - 60), ("envoy-2", clock.now - 60)])
    p99_check = {"name": "p99", "template": "request-duration-p99", "compare": {"by": "ratio", "max": 1.2}}
    analysis = envoy_analysis({"name": "success", "template": "request-success-rate", "min": 99}, p99_check)
    success, p99 = asyncio.run(run_checks({ENVOY: provider}, analysis, CANARY, STABLE))
    assert success.outcome is CheckOutcome.FAIL and success.value == pytest.approx(70.0)
    assert p99.outcome is CheckOutcome.FAIL and (p99.value, p99.stable_value) == (45.0, 30.0)


def test_samples_per_second_has_a_default_and_bounds() -> None:
    assert envoy_analysis({"name": "s", "template": "request-success-rate", "min": 99}).samples_per_second == 100
    with pytest.raises(ValidationError):
        envoy_analysis({"name": "s", "template": "request-success-rate", "min": 99}, samplesPerSecond=0)


def test_only_proxies_that_take_every_listener_are_expected_to_report() -> None:
    from aviary.app import expected_reporters
    from aviary.discovery import typeurls
    from aviary.discovery.proxy_events import ProxyConnected, SubscriptionChanged
    from aviary.discovery.proxy_status import ProxyStatus

    proxies = ProxyStatus()
    proxies.apply(ProxyConnected(1, "envoy-1", "edge", "ipv4:127.0.0.1:1", 100.0))
    proxies.apply(SubscriptionChanged(1, typeurls.LISTENER, True, frozenset()))
    proxies.apply(ProxyConnected(2, "grpc-client", "edge", "ipv4:127.0.0.1:2", 100.0))  # proxyless gRPC
    proxies.apply(SubscriptionChanged(2, typeurls.LISTENER, False, frozenset({"shop"})))
    assert expected_reporters(proxies) == [("envoy-1", "edge", 100.0)]


def test_listeners_of_envoy_provider_rollouts_send_access_logs_to_the_xds_cluster() -> None:
    from dataclasses import replace

    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_access_log_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from google.protobuf import any_pb2

    from aviary.discovery import typeurls
    from aviary.discovery.resources import GRPC_ACCESS_LOG, PublishedRollout, build_snapshot, listener_name
    from aviary.policy.schema import Endpoint, ListenerSpec
    from aviary.traffic import Backend

    v1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:8080"),))
    plain = PublishedRollout.of("shop", ListenerSpec(address="127.0.0.1", port=10000), ("*",), ((v1, 100),), (v1,))

    def access_logs(rollout: PublishedRollout) -> list[Any]:
        resource = build_snapshot([rollout]).items(typeurls.LISTENER)[listener_name(rollout.listener)]
        listener = listener_pb2.Listener()
        any_pb2.Any.FromString(resource.any_bytes).Unpack(listener)
        manager = http_connection_manager_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
        return list(manager.access_log)

    assert access_logs(plain) == []
    [log] = access_logs(replace(plain, access_log=True))
    config = grpc_access_log_pb2.HttpGrpcAccessLogConfig()
    log.typed_config.Unpack(config)
    assert log.name == GRPC_ACCESS_LOG
    assert config.common_config.grpc_service.envoy_grpc.cluster_name == "xds_cluster"


def test_the_access_log_is_sampled_per_slot_by_token_buckets_served_on_ads() -> None:
    """Per access-logging rollout and slot, a (CEL slot test, process_ratelimit bucket) pair in an
    or_filter; the route's metadata gives each routed cluster its slot (stable 0, canary 1), so a new
    canary changes the route, not the listener; a TokenBucket per slot of samplesPerSecond a second,
    whose SotW entry carries its name (a Resource wrapper)."""
    from dataclasses import replace

    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
    from envoy.extensions.access_loggers.filters.process_ratelimit.v3 import process_ratelimit_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.type.v3 import token_bucket_pb2
    from google.protobuf import any_pb2, json_format

    from aviary.discovery import typeurls, wire
    from aviary.discovery.resources import (
        CEL_LOG_FILTER,
        RATELIMIT_LOG_FILTER,
        SAMPLING_METADATA,
        SAMPLING_SLOTS,
        PublishedRollout,
        build_snapshot,
        listener_name,
        route_name,
    )
    from aviary.policy.schema import Endpoint, ListenerSpec
    from aviary.traffic import Backend

    v1, v2 = (Backend(v, (Endpoint.model_validate("127.0.0.1:8080"),)) for v in ("v1", "v2"))
    spec = ListenerSpec(address="127.0.0.1", port=10000)
    stable_only = replace(PublishedRollout.of("shop", spec, ("*",), ((v1, 100),), (v1,)), access_log=True,
                          samples_per_second=25)
    canary = replace(PublishedRollout.of("shop", spec, ("*",), ((v1, 90), (v2, 10)), (v1, v2)), access_log=True,
                     samples_per_second=25)
    snapshot, before = build_snapshot([canary]), build_snapshot([stable_only])
    listener_resource = snapshot.items(typeurls.LISTENER)[listener_name(spec)]
    assert listener_resource.version == before.items(typeurls.LISTENER)[listener_name(spec)].version

    listener = listener_pb2.Listener()
    any_pb2.Any.FromString(listener_resource.any_bytes).Unpack(listener)
    manager = http_connection_manager_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    [log] = manager.access_log
    buckets_named: list[str] = []
    for slot, per_slot in enumerate(log.filter.or_filter.filters):
        cel, limit = per_slot.and_filter.filters
        assert (cel.extension_filter.name, limit.extension_filter.name) == (CEL_LOG_FILTER, RATELIMIT_LOG_FILTER)
        expression, bucket = cel_pb2.ExpressionFilter(), process_ratelimit_pb2.ProcessRateLimitFilter()
        cel.extension_filter.typed_config.Unpack(expression)
        limit.extension_filter.typed_config.Unpack(bucket)
        assert bucket.dynamic_config.config_source.HasField("ads")
        assert expression.expression.endswith(f"[xds.cluster_name] == 'shop#{slot}'"), expression.expression
        buckets_named.append(bucket.dynamic_config.resource_name)
    assert buckets_named == [f"aviary-samples-shop-{slot}" for slot in range(SAMPLING_SLOTS)]

    route = route_pb2.RouteConfiguration()
    any_pb2.Any.FromString(snapshot.items(typeurls.ROUTE)[route_name(spec)].any_bytes).Unpack(route)
    [weighted] = route.virtual_hosts[0].routes
    slots = json_format.MessageToDict(weighted.metadata.filter_metadata[SAMPLING_METADATA])
    assert slots == {"shop_v1": "shop#0", "shop_v2": "shop#1"}

    buckets = snapshot.items(typeurls.TOKEN_BUCKET)
    assert sorted(buckets) == buckets_named
    for name, resource in buckets.items():
        assert not resource.wildcard
        response = discovery_pb2.DiscoveryResponse.FromString(
            wire.discovery_response("1", typeurls.TOKEN_BUCKET, "n", [resource.entry]))
        [entry] = response.resources
        wrapper = discovery_pb2.Resource()
        assert entry.Unpack(wrapper) and wrapper.name == name and wrapper.version == resource.version
        token_bucket = token_bucket_pb2.TokenBucket()
        assert wrapper.resource.Unpack(token_bucket)
        assert (token_bucket.max_tokens, token_bucket.tokens_per_fill.value, token_bucket.fill_interval.seconds) == (
            25, 25, 1)
    # without access_log: no buckets, no metadata
    plain = build_snapshot([replace(canary, access_log=False)])
    assert not plain.items(typeurls.TOKEN_BUCKET)
    any_pb2.Any.FromString(plain.items(typeurls.ROUTE)[route_name(spec)].any_bytes).Unpack(route)
    assert not route.virtual_hosts[0].routes[0].HasField("metadata")


def test_an_envoy_on_per_type_services_gets_the_access_log_unsampled_and_no_buckets() -> None:
    """Token buckets come over ADS only: for an Envoy without ADS the filter goes (Aviary's cap
    on arrival keeps samplesPerSecond) rather than a listener it would reject."""
    from dataclasses import replace

    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from google.protobuf import any_pb2

    from aviary.discovery import typeurls
    from aviary.discovery.config_sources import for_per_type
    from aviary.discovery.resources import GRPC_ACCESS_LOG, PublishedRollout, build_snapshot, listener_name
    from aviary.policy.schema import Endpoint, ListenerSpec
    from aviary.traffic import Backend

    v1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:8080"),))
    rollout = PublishedRollout.of("shop", ListenerSpec(address="127.0.0.1", port=10000), ("*",), ((v1, 100),), (v1,))
    snapshot = build_snapshot([replace(rollout, access_log=True)])
    for delta in (False, True):
        rendered = for_per_type(snapshot, delta, "xds_cluster")
        assert not rendered.items(typeurls.TOKEN_BUCKET)
        resource = rendered.items(typeurls.LISTENER)[listener_name(rollout.listener)]
        listener = listener_pb2.Listener()
        any_pb2.Any.FromString(resource.any_bytes).Unpack(listener)
        manager = http_connection_manager_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
        [log] = manager.access_log
        assert log.name == GRPC_ACCESS_LOG and not log.HasField("filter")
        assert manager.rds.config_source.HasField("api_config_source")
