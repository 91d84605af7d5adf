"""``analysis.provider: envoy`` through a real Envoy that reports to Aviary itself, and no Prometheus.

The module's Envoy has deploy/envoy/bootstrap.yaml's metrics service sink (flushing every 0.5 s);
the listeners of ``provider: envoy`` rollouts carry the gRPC access log to the control plane. A
second Envoy, of node cluster ``nosink``, has no sink (started by the last test only): a rollout served to it
(``proxyCluster``) has checks that cannot be answered.

- a canary failing 30 % of its requests at >= 20 requests per second is rolled back; the time from
  its first failed request to weight 0 at Envoy is recorded (``make bench`` gives the p50 over 5
  runs beside the Prometheus provider's); only a generous bound is asserted;
- the judge, on the access-log samples, rolls back a canary answering in 45 ms against a stable in
  30 ms (both fall in Envoy's default 25-50 ms histogram bucket, so Prometheus' p99 reads the same
  for both), while a p99 threshold both pass passes;
- the same policy promotes a canary as fast as stable;
- at about three times the policy's ``samplesPerSecond`` per cluster, Envoy itself sends about
  ``samplesPerSecond`` access-log entries per cluster and second (its ``process_ratelimit`` filter,
  a token bucket per rollout and slot served over ADS): counted as they arrive, before Aviary's own cap;
  the same from a delta-ADS Envoy, and from a keep-alive connection opened before the canary (the
  slot of a cluster is in the route's metadata, so a canary leaves the listener as it was); buckets
  added, updated and removed through two promotions leave
  Envoy up; an Envoy without ADS gets the access log unsampled (and accepts the listener);
- a proxy without the sink makes the checks inconclusive, naming it.

Figures are written to ``tests/e2e/.results/envoy_provider.json``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aviary.discovery.resources import route_name
from aviary.policy.analysis import CheckOutcome
from aviary.policy.rollout_state import Phase
from aviary.policy.schema import ListenerSpec
from tests.conftest import LoadgenFactory
from tests.e2e.test_rollouts import Canary, Rig, _merged, canaries
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane, write_policy
from tests.rig.envoy import EnvoyProcess
from tests.rig.loadgen import LoadGenerator, send_requests
from tests.rig.ports import free_port, port_open
from tests.rig.stage import HOST, write_results
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENTS = 4
RATE_PER_CLIENT = 40.0  # ~160 req/s: ~32 req/s to a canary at 20 %
JUDGE_RATE_PER_CLIENT = 8.0  # ~32 req/s: ~16 samples per 1 s step per side at 50 %
STABLE_MS = 30.0
SLOWER_MS = 45.0
NOSINK = "nosink"
DELTA = "delta"
PER_TYPE = "pertype"
SAMPLES_PER_SECOND = 10
SAMPLING_RATE_PER_CLIENT = 15.0  # ~60 req/s: ~30 a second per cluster at 50 %, three times the samples
SAMPLING_WINDOW_S = 5.0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A control plane, an Envoy reporting to it and one that does not; no Prometheus."""
    base = tmp_path_factory.mktemp("envoy-provider")
    policies = base / "policies"
    policies.mkdir()
    plane = RunningControlPlane(policies, poll_interval=0.2)
    envoy: EnvoyProcess | None = None
    try:
        plane.start()
        envoy = EnvoyProcess(base / "envoy", plane.xds_port, reports=True).start()
        rig = Rig(plane, envoy, None, policies)  # type: ignore[arg-type]  # no Prometheus here
        yield rig
        write_results("envoy_provider", rig.timings)
    finally:
        if envoy is not None:
            with contextlib.suppress(Exception):
                envoy.stop()
        plane.stop()


@pytest.fixture
def canary_factory(rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory) -> Iterator[Callable[..., Canary]]:
    """``canary_factory(name, rate)``: v1 serving through the reporting Envoy under load, v2 started (``canaries``)."""
    with canaries(rig, backends, loadgen_factory, clients=CLIENTS, rate=RATE_PER_CLIENT, warm_up=20) as make:
        yield make


def envoy_analysis(metrics: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Checks every 0.5 s (the sink's flush) over a 5 s window, no Prometheus anywhere."""
    return {"provider": "envoy", "checkEvery": "500ms", "window": "5s", "minRequests": 5, "failureLimit": 0,
            "inconclusiveLimit": 10, "metrics": metrics, **overrides}


SUCCESS_RATE = {"name": "success", "template": "request-success-rate", "min": 99}


def judge_policy() -> tuple[dict[str, Any], dict[str, Any]]:
    """One 50 % step of 15 s; a p99 threshold both versions pass, and the judge on exact samples."""
    strategy = {"steps": [50], "interval": "15s"}
    analysis = envoy_analysis(
        [{"name": "p99-threshold", "template": "request-duration-p99", "max": 150}],
        window="5s",
        judge={"metrics": [{"name": "latency", "template": "request-duration-p50", "direction": "increase",
                            "critical": True},
                           {"name": "errors", "template": "error-rate-5xx", "direction": "increase"}],
               "minSamples": 8, "step": "1s"})
    return strategy, analysis


def test_a_canary_failing_30_percent_is_rolled_back_from_envoy_reports(
        rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("env-errors")
    canary.backends.set_behaviour("v2", error_rate=0.3)
    canary.start({"steps": [20, 50], "interval": "30s"}, envoy_analysis([SUCCESS_RATE]))
    status = canary.wait_until_settled(40)
    story = rig.story(canary.name)
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
    [success] = status.last_checks
    assert success.outcome is CheckOutcome.FAIL and success.value is not None and success.value < 99, story
    assert success.queries == ('request-success-rate{cluster="env-errors_v2"}[5s]',), story

    wait_until(lambda: canary.watch.canary_weight() == 0, 10, what="canary weight 0 in envoy")
    assert canary.load is not None
    first_5xx = canary.load.snapshot().first_status_5xx_at
    assert first_5xx is not None
    zero_at = canary.watch.first_zero_after(first_5xx)
    assert zero_at is not None, canary.watch.describe()
    detection_s = zero_at - first_5xx
    rig.record("error_canary", first_5xx_to_weight_0_s=detection_s, goal_s=1.5)
    assert detection_s < 15, f"{detection_s:.2f}s\n{story}\n{canary.watch.describe()}"


def test_the_judge_on_access_log_samples_rolls_back_a_canary_at_45ms_against_30ms(
        rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("env-slow", rate=JUDGE_RATE_PER_CLIENT)
    canary.backends.set_behaviour("v1", latency_ms=STABLE_MS)
    canary.backends.set_behaviour("v2", latency_ms=SLOWER_MS)
    started = time.monotonic()
    canary.start(*judge_policy())
    status = canary.wait_until_settled(60)
    story = rig.story(canary.name)
    assert status.phase is Phase.ROLLED_BACK and status.failed_version == "v2", story
    checks = {check.name: check for check in status.last_checks}
    threshold, latency, verdict = checks["p99-threshold"], checks["latency"], checks["judge"]
    assert threshold.outcome is CheckOutcome.PASS, story
    assert latency.outcome is CheckOutcome.FAIL and latency.value is not None, story
    assert latency.stable_value is not None and latency.value - latency.stable_value > 10, story  # exact ms
    assert verdict.outcome is CheckOutcome.FAIL and "critical metric failed: latency" in verdict.reason, story
    rig.record("judge_slow", decided_s=time.monotonic() - started, canary_p50_ms=latency.value,
               stable_p50_ms=latency.stable_value, samples=latency.canary_samples)


def test_the_same_policy_promotes_a_canary_as_fast_as_stable(
        rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("env-fine", rate=JUDGE_RATE_PER_CLIENT)
    canary.backends.set_behaviour("v1", latency_ms=STABLE_MS)
    canary.backends.set_behaviour("v2", latency_ms=STABLE_MS)
    started = time.monotonic()
    canary.start(*judge_policy())
    status = canary.wait_until_settled(60)
    story = rig.story(canary.name)
    assert status.phase is Phase.STABLE and status.stable.version == "v2", story
    assert canary.load is not None
    result = canary.load.stop()
    assert result.failed == 0, result.failures
    rig.record("judge_promoted", decided_s=time.monotonic() - started)


def _sampled_rates(rig: Rig, name: str, load: LoadGenerator, key: str) -> None:
    """Over a window, the requests each version of ``name`` got and the entries of each that arrived
    (before Aviary's cap); asserts about ``SAMPLES_PER_SECOND`` of each, and records the figures."""
    clusters = (f"{name}_v1", f"{name}_v2")

    def received() -> tuple[int, ...]:
        return rig.plane.call(lambda plane: tuple(plane.envoy_reports.received_samples(c) for c in clusters))

    wait_until(lambda: all(count > 0 for count in received()), 10, what="entries of both clusters")
    before, load_before, started = received(), load.snapshot(), time.monotonic()
    time.sleep(SAMPLING_WINDOW_S)  # a measuring window, not a synchronisation
    after, load_after, elapsed = received(), load.snapshot(), time.monotonic() - started
    story = rig.story(name)
    sent = [(load_after.by_version.get(v, 0) - load_before.by_version.get(v, 0)) / elapsed for v in ("v1", "v2")]
    rates = [(a - b) / elapsed for a, b in zip(after, before, strict=True)]
    dropped = rig.plane.call(lambda plane: [plane.envoy_reports.dropped_samples(c) for c in clusters])
    rig.record(key, samples_per_second=SAMPLES_PER_SECOND, requests_per_second=sent,
               entries_per_second=rates, dropped_on_arrival=dropped)
    assert all(rate >= 2 * SAMPLES_PER_SECOND for rate in sent), (sent, story)  # the load is what we claim
    for rate in rates:  # unsampled, each would be ~3x; one extra bucketful at most over the window
        assert 0.5 * SAMPLES_PER_SECOND <= rate <= 1.6 * SAMPLES_PER_SECOND, (rates, sent, story)
    status = rig.status(name)
    assert status is not None and status.phase is Phase.PROGRESSING, story


def test_envoy_sends_about_samples_per_second_entries_per_cluster(
        rig: Rig, canary_factory: Callable[..., Canary]) -> None:
    canary = canary_factory("env-sampled", rate=SAMPLING_RATE_PER_CLIENT)
    canary.start({"steps": [50], "interval": "60s"},
                 envoy_analysis([SUCCESS_RATE], samplesPerSecond=SAMPLES_PER_SECOND))
    canary.wait_for_route({"env-sampled_v1": 50, "env-sampled_v2": 50}, timeout=15)
    assert canary.load is not None
    _sampled_rates(rig, canary.name, canary.load, "sampling")


def test_a_delta_ads_envoy_gets_its_buckets_and_samples_alike(
        rig: Rig, backends: Backends, envoy_factory: Callable[..., EnvoyProcess],
        loadgen_factory: LoadgenFactory) -> None:
    """The same over incremental ADS: there the bucket's name travels in the delta Resource."""
    backends.start(["v1", "v2"])
    port, name = free_port(), "env-delta"
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    envoy = envoy_factory(rig.plane.xds_port, node_id="envoy-delta", node_cluster=DELTA, delta=True, reports=True)
    analysis = envoy_analysis([SUCCESS_RATE], samplesPerSecond=SAMPLES_PER_SECOND)
    try:
        write_policy(rig.policies, name, port=port, version="v1", endpoints=[backends.address("v1")],
                     proxy_cluster=DELTA)
        wait_until(lambda: _merged(envoy.route_weights(route)) == {f"{name}_v1": 100} and port_open(port), 15,
                   what="the delta Envoy to route the rollout")
        load = loadgen_factory(f"127.0.0.1:{port}", HOST, CLIENTS, SAMPLING_RATE_PER_CLIENT)
        load.wait_for_requests(20, timeout=15)
        write_policy(rig.policies, name, port=port, version="v2", endpoints=[backends.address("v2")],
                     proxy_cluster=DELTA, strategy={"steps": [50], "interval": "60s"}, analysis=analysis)
        wait_until(lambda: _merged(envoy.route_weights(route)) == {f"{name}_v1": 50, f"{name}_v2": 50}, 15,
                   what="the delta Envoy to split 50/50")
        _sampled_rates(rig, name, load, "sampling_delta")
        assert not envoy.log_errors(), envoy.log_errors()
    finally:
        (rig.policies / f"{name}.yaml").unlink(missing_ok=True)


def test_a_keep_alive_connection_opened_before_the_canary_samples_it_too(
        rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory) -> None:
    """One keep-alive client, connected while only v1 existed: the canary changes the route (whose
    metadata gives v2 its slot), not the listener, so that connection's entries include v2's.
    (With the clusters named in the listener, its old version kept sampling v1 only: 4.4 v2 entries
    a second of 10 until the connection drained.)"""
    backends.start(["v1", "v2"])
    port, name = free_port(), "env-keep"
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    analysis = envoy_analysis([SUCCESS_RATE], samplesPerSecond=SAMPLES_PER_SECOND)
    try:
        write_policy(rig.policies, name, port=port, version="v1", endpoints=[backends.address("v1")],
                     analysis=analysis)
        wait_until(lambda: _merged(rig.envoy.route_weights(route)) == {f"{name}_v1": 100} and port_open(port), 15,
                   what="v1 routed")
        load = loadgen_factory(f"127.0.0.1:{port}", HOST, 1, 4 * SAMPLING_RATE_PER_CLIENT)  # client 0: keep-alive
        load.wait_for_requests(20, timeout=15)
        write_policy(rig.policies, name, port=port, version="v2", endpoints=[backends.address("v2")],
                     strategy={"steps": [50], "interval": "60s"}, analysis=analysis)
        wait_until(lambda: _merged(rig.envoy.route_weights(route)) == {f"{name}_v1": 50, f"{name}_v2": 50}, 15,
                   what="a 50/50 split")
        _sampled_rates(rig, name, load, "sampling_keep_alive")
    finally:
        (rig.policies / f"{name}.yaml").unlink(missing_ok=True)


def test_buckets_follow_two_promotions_and_a_rate_change_without_hurting_envoy(
        rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory) -> None:
    """v1 -> v2 -> v3 under load, the last with another samplesPerSecond: five listener versions
    naming buckets that are added, updated (a filter made while its bucket already existed sees
    the update) and removed (while older listener versions drain). Envoy 1.40 stays up and takes
    every update; no request fails."""
    backends.start(["v1", "v2", "v3"])
    port, name = free_port(), "env-life"
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    try:
        write_policy(rig.policies, name, port=port, version="v1", endpoints=[backends.address("v1")],
                     analysis=envoy_analysis([SUCCESS_RATE], samplesPerSecond=SAMPLES_PER_SECOND))
        wait_until(lambda: _merged(rig.envoy.route_weights(route)) == {f"{name}_v1": 100} and port_open(port), 15,
                   what="v1 routed")
        load = loadgen_factory(f"127.0.0.1:{port}", HOST, 2, 10.0)
        load.wait_for_requests(20, timeout=15)
        for version, per_second in (("v2", SAMPLES_PER_SECOND), ("v3", 2 * SAMPLES_PER_SECOND)):
            write_policy(rig.policies, name, port=port, version=version, endpoints=[backends.address(version)],
                         strategy={"steps": [50], "interval": "2s"},
                         analysis=envoy_analysis([SUCCESS_RATE], samplesPerSecond=per_second))
            wait_until(lambda v=version: _merged(rig.envoy.route_weights(route)) == {f"{name}_{v}": 100}, 30,
                       what=f"{version} promoted")
        result = load.wait_for_requests(40, timeout=15)
        assert rig.envoy.alive, rig.envoy.describe()
        assert not rig.envoy.log_errors(), rig.envoy.log_errors()
        assert result.failed == 0, result.failures
    finally:
        (rig.policies / f"{name}.yaml").unlink(missing_ok=True)


def test_an_envoy_without_ads_accepts_the_listener_and_sends_entries_unsampled(
        rig: Rig, backends: Backends, tmp_path: Path) -> None:
    """Token buckets exist on ADS only: an Envoy on per-type services gets the access log without
    the sampling filter (a listener naming an ADS source it would reject), and Aviary's cap keeps
    samplesPerSecond on arrival."""
    backends.start(["v1"])
    port, name = free_port(), "env-pertype"
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    envoy = EnvoyProcess(tmp_path / "envoy", rig.plane.xds_port, "envoy-pertype", PER_TYPE, per_type=True,
                         reports=True)
    try:
        envoy.start()
        write_policy(rig.policies, name, port=port, version="v1", endpoints=[backends.address("v1")],
                     proxy_cluster=PER_TYPE, analysis=envoy_analysis([SUCCESS_RATE]))
        wait_until(lambda: _merged(envoy.route_weights(route)) == {f"{name}_v1": 100} and port_open(port), 15,
                   what="the per-type Envoy to route the rollout")
        assert send_requests(port, HOST, 20).get("v1") == 20
        wait_until(lambda: rig.plane.call(lambda plane: plane.envoy_reports.received_samples(f"{name}_v1")) >= 20,
                   10, what="every entry, unsampled")
        assert not envoy.log_errors(), envoy.log_errors()
    finally:
        (rig.policies / f"{name}.yaml").unlink(missing_ok=True)
        envoy.stop()


def test_a_proxy_without_the_sink_makes_the_checks_inconclusive(
        rig: Rig, backends: Backends, envoy_factory: Callable[..., EnvoyProcess]) -> None:
    backends.start(["v1", "v2"])
    port = free_port()
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    nosink = envoy_factory(rig.plane.xds_port, node_id="envoy-nosink", node_cluster=NOSINK)  # no sink
    write_policy(rig.policies, "env-nosink", port=port, version="v1", endpoints=[backends.address("v1")],
                 proxy_cluster=NOSINK)
    wait_until(lambda: _merged(nosink.route_weights(route)) == {"env-nosink_v1": 100}, 15,
               what="the nosink Envoy to route the rollout")
    # 12 inconclusive rounds at 0.5 s outlast the grace a newly connected proxy has to report.
    write_policy(rig.policies, "env-nosink", port=port, version="v2", endpoints=[backends.address("v2")],
                 proxy_cluster=NOSINK, strategy={"steps": [20], "interval": "30s"},
                 analysis=envoy_analysis([SUCCESS_RATE], inconclusiveLimit=12, onInconclusive="rollback"))
    try:
        def rolled_back() -> Any:
            status = rig.status("env-nosink")
            return status if status is not None and status.phase is Phase.ROLLED_BACK else None

        status = wait_until(rolled_back, 30, what="the rollout to give up on inconclusive checks")
        story = rig.story("env-nosink")
        [success] = status.last_checks
        assert success.outcome is CheckOutcome.INCONCLUSIVE, story
        assert "not reporting (envoy-nosink)" in success.reason and "metrics_service" in success.reason, story
        assert "envoy-1" not in success.reason, story  # it reports, and serves other rollouts anyway
    finally:
        (rig.policies / "env-nosink.yaml").unlink(missing_ok=True)
