"""Foundation end to end: aviary.app.ControlPlane driving a real Envoy 1.40 over ADS.

Each test runs with Envoy's ADS in State-of-the-World (GRPC) and in incremental (DELTA_GRPC) mode;
one more runs an Envoy without ADS, on the per-type discovery services (tests/rig/bootstrap-per-type.yaml).
Each test: HTTP backends (one port per version), a policy directory in tmp, the control plane on
its own loop thread (tests/rig/control_plane.py), one Envoy. Weights are set only through
``TrafficDirector.set_desired_traffic``. Timing numbers are printed (run with ``-s`` to see them),
not asserted, except for generous bounds that catch hangs.
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aviary.app import ControlPlane
from aviary.discovery import typeurls
from aviary.policy.schema import Endpoint
from aviary.traffic import Backend, TrafficPlan
from tests.conftest import ControlPlaneFactory, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane, write_policy
from tests.rig.envoy import EnvoyProcess
from tests.rig.loadgen import send_requests
from tests.rig.ports import free_port
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"


@dataclass
class Stage:
    """One rollout (`shop`, stable v1) served by one Envoy on ``port``."""

    backends: Backends
    policies: Path
    cp: RunningControlPlane
    envoy: EnvoyProcess
    port: int

    @property
    def route(self) -> str:
        return f"route-127.0.0.1-{self.port}"

    def backend(self, version: str) -> Backend:
        return Backend(version, (Endpoint.model_validate(self.backends.address(version)),))

    def set_traffic(self, traffic: TrafficPlan, name: str = NAME) -> None:
        self.cp.call(lambda p: p.director.set_desired_traffic(name, traffic))

    def acked(self, name: str = NAME) -> TrafficPlan | None:
        return self.cp.call(lambda p: p.director.acked(name))

    def wait_acked(self, traffic: TrafficPlan, timeout: float = 10.0, interval: float = 0.01) -> None:
        wait_until(lambda: self.acked() == traffic, timeout, interval, what=f"ACK of {traffic}")

    def envoy_weights(self) -> dict[str, int]:
        return self.envoy.route_weights(self.route).get(NAME, {})

    def wait_envoy_weights(self, weights: dict[str, int], timeout: float = 10.0) -> None:
        self.envoy.wait_rollout_weights(self.route, NAME, weights, timeout)

    def lds_responses(self) -> float:
        """LDS responses the plane has sent (its aviary_xds_responses metric), to every proxy."""
        return self.cp.call(
            lambda p: p.metrics.registry.get_sample_value("aviary_xds_responses_total", {"type": "LDS"}) or 0.0
        )

    def proxy(self, node_id: str = NODE) -> dict[str, Any]:
        """A plain copy of what the plane knows about one connected proxy (empty if none)."""

        def read(p: ControlPlane) -> dict[str, Any]:
            for view in p.proxies:
                if view.node_id == node_id:
                    return {
                        "stream_id": view.stream_id,
                        "nacks": view.nacks,
                        "last_nack": view.last_nack,
                        "acked_versions": dict(view.acked_versions),
                        "connected_at": view.connected_at,
                    }
            return {}

        return self.cp.call(read)


def _stage(
    workdir: Path,
    backends: Backends,
    control_plane_factory: ControlPlaneFactory,
    envoy_factory: EnvoyFactory,
    delta: bool,
    per_type: bool = False,
) -> Stage:
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    port = free_port()
    write_policy(policies, NAME, port=port, version="v1", endpoints=[backends.address("v1")], hosts=(HOST,))
    cp = control_plane_factory(policies, poll_interval=0.2)
    envoy = envoy_factory(cp.xds_port, node_id=NODE, delta=delta, start=False)
    envoy.per_type = per_type
    envoy.start()
    envoy.wait_ready()
    envoy.wait_for_listener(port)
    return Stage(backends, policies, cp, envoy, port)


@pytest.fixture(params=["GRPC", "DELTA_GRPC"])
def stage(
    request: pytest.FixtureRequest,
    workdir: Path,
    backends: Backends,
    control_plane_factory: ControlPlaneFactory,
    envoy_factory: EnvoyFactory,
) -> Stage:
    """Every test runs twice: Envoy's ADS in State-of-the-World (``api_type: GRPC``) and incremental
    (``DELTA_GRPC``) mode."""
    return _stage(workdir, backends, control_plane_factory, envoy_factory, request.param == "DELTA_GRPC")


@pytest.fixture(params=["GRPC", "DELTA_GRPC"])
def per_type_stage(
    request: pytest.FixtureRequest,
    workdir: Path,
    backends: Backends,
    control_plane_factory: ControlPlaneFactory,
    envoy_factory: EnvoyFactory,
) -> Stage:
    """An Envoy without ADS: LDS and CDS from ``api_config_source`` (State-of-the-World or incremental),
    RDS and EDS from the config sources Aviary's listeners and clusters name."""
    return _stage(workdir, backends, control_plane_factory, envoy_factory, request.param == "DELTA_GRPC",
                  per_type=True)  # fmt: skip


def _percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    if not ms:
        return "no samples"
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"n={len(ms)} median={statistics.median(ms):.2f} ms p99={p99:.2f} ms max={ms[-1]:.2f} ms"


# ---------------------------------------------------------------------------------------------


def test_canary_weight_10_splits_requests(stage: Stage) -> None:
    traffic = TrafficPlan(stage.backend("v1"), stage.backend("v2"), canary_weight=10)
    stage.set_traffic(traffic)
    stage.wait_envoy_weights({"v1": 90, "v2": 10})
    stage.wait_acked(traffic)

    counts = send_requests(stage.port, HOST, 2000)
    share = 100 * counts.get("v2", 0) / 2000
    print(f"\nsplit at canary weight 10: {counts} -> v2 {share:.1f} %")
    assert counts["failed"] == 0, counts
    assert counts.get("v1", 0) + counts.get("v2", 0) == 2000, counts
    assert 7.0 <= share <= 13.0, counts


def test_per_type_streams_serve_routes_and_weight_changes_as_one_proxy(per_type_stage: Stage) -> None:
    """The foundation path without ADS: the route is served, weight changes reach Envoy, and the
    director reports each ACKed (its gates read the four streams of the node as one proxy)."""
    stage = per_type_stage
    v1, v2 = stage.backend("v1"), stage.backend("v2")
    assert send_requests(stage.port, HOST, 50) == {"failed": 0, "v1": 50}
    for weight in (10, 60):
        traffic = TrafficPlan(v1, v2, canary_weight=weight)
        stage.set_traffic(traffic)
        stage.wait_envoy_weights({"v1": 100 - weight, "v2": weight})
        stage.wait_acked(traffic)
    counts = send_requests(stage.port, HOST, 200)
    assert counts["failed"] == 0 and counts.get("v1", 0) + counts.get("v2", 0) == 200, counts

    def views(p: ControlPlane) -> list[tuple[str, list[str]]]:
        return [(v.node_id, sorted(typeurls.short_name(t) for t in v.acked)) for v in p.proxies]

    assert stage.cp.call(views) == [(NODE, ["CDS", "EDS", "LDS", "RDS"])]
    assert stage.envoy.log_errors() == []


def test_fifty_weight_changes_under_load(stage: Stage, loadgen_factory: LoadgenFactory) -> None:
    v1, v2 = stage.backend("v1"), stage.backend("v2")
    stage.set_traffic(TrafficPlan(v1, v2, 0))  # the canary cluster first: later changes are RDS only
    stage.wait_acked(TrafficPlan(v1, v2, 0))

    lg = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=4, rate_per_client=80)
    lg.wait_for_requests(100)
    latencies_before = stage.cp.call(lambda p: len(p.proxies.push_ack_latencies))
    weights = [(i * 37) % 101 for i in range(1, 51)]  # 37, 74, 10, 47, ... all of 0..100 apart
    t0 = time.monotonic()
    change_to_ack: list[float] = []
    for weight in weights:
        traffic = TrafficPlan(v1, v2, weight)
        started = time.monotonic()
        stage.set_traffic(traffic)
        stage.wait_acked(traffic, interval=0.002)
        change_to_ack.append(time.monotonic() - started)
        lg.wait_for_requests(10)  # let traffic flow at this weight before the next change
    elapsed = time.monotonic() - t0
    stage.wait_envoy_weights({"v1": 100 - weights[-1], "v2": weights[-1]})
    lg.wait_for_requests(100)
    result = lg.stop()
    latencies = stage.cp.call(lambda p: list(p.proxies.push_ack_latencies[latencies_before:]))

    print(
        f"\n50 weight changes in {elapsed:.2f} s under {result.total} requests "
        f"({result.total / result.duration_s:.0f} req/s, by version {result.by_version}, failed {result.failed})"
        f"\npush->ACK (plane's proxies.push_ack_latencies): {_percentiles(latencies)}"
        f"\nset_desired_traffic -> director.acked() seen by the test (poll 2 ms): {_percentiles(change_to_ack)}"
    )
    assert result.failed == 0, (result.failures, _envoy_5xx(stage.envoy))
    assert _envoy_5xx(stage.envoy) == {}
    assert set(result.by_version) == {"v1", "v2"}, result.by_version
    assert len(latencies) >= 50  # one RDS ACK per change at least
    assert max(change_to_ack) < 5.0  # a hang, not a slow ACK


def test_version_change_in_policy_file_under_load(stage: Stage, loadgen_factory: LoadgenFactory) -> None:
    lg = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=4, rate_per_client=80)
    lg.wait_for_requests(100)

    t0 = time.monotonic()
    write_policy(
        stage.policies, NAME, port=stage.port, version="v2", endpoints=[stage.backends.address("v2")], hosts=(HOST,)
    )
    probes: dict[str, int] = {"failed": 0}

    def all_fresh_requests_on_v2() -> bool:
        counts = send_requests(stage.port, HOST, 20)
        for key, n in counts.items():
            probes[key] = probes.get(key, 0) + n
        return counts == {"v2": 20, "failed": 0}

    wait_until(all_fresh_requests_on_v2, 15, interval=0.02, what="every fresh request answered by v2")
    on_v2 = time.monotonic() - t0
    wait_until(lambda: f"{NAME}_v1" not in stage.envoy.cluster_names(), 15, interval=0.02, what=f"{NAME}_v1 removed")
    v1_gone = time.monotonic() - t0
    gone_at = time.time()
    clusters = stage.envoy.cluster_names()
    # The loadgen's progress file lags up to 0.1 s: take a base written after the old cluster was gone
    # (plus 0.1 s for requests already in flight then).
    settled = wait_until(
        lambda: (snap := lg.snapshot()).started_at + snap.duration_s > gone_at + 0.1 and snap,
        5,
        what="a loadgen snapshot written after the old cluster was gone",
    )
    lg.wait_for_requests(100)
    result = lg.stop()
    after_settled = result.minus(settled)

    print(
        f"\npolicy v1 -> v2 (watcher poll 0.2 s): 100 % v2 after {on_v2:.2f} s, {NAME}_v1 gone from Envoy after "
        f"{v1_gone:.2f} s; Envoy clusters {sorted(clusters)}"
        f"\nloadgen {result.total} requests {result.by_version}, failed {result.failed}; "
        f"after the old cluster was gone {after_settled}; probes {probes}"
    )
    # A 503 with an empty body and `no_cluster` here means the old cluster left before the route did.
    assert result.failed == 0, (result.failures, _envoy_5xx(stage.envoy))
    assert probes["failed"] == 0, (probes, _envoy_5xx(stage.envoy))
    assert _envoy_5xx(stage.envoy) == {}
    assert clusters == {f"{NAME}_v2"}
    assert stage.envoy_weights() == {f"{NAME}_v2": 100}
    assert after_settled.get("v1", 0) == 0 and after_settled["v2"] >= 100, after_settled


def test_nack_is_recorded_not_resent_and_old_config_keeps_serving(stage: Stage) -> None:
    # A port Envoy cannot bind: held by a plain listening socket (no SO_REUSEPORT).
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        blocked_port = holder.getsockname()[1]
        # Envoy serves the listener (the stage waited for that) a moment before its ACK reaches the plane.
        lds_before = wait_until(
            lambda: stage.proxy().get("acked_versions", {}).get(typeurls.LISTENER), 10, what="the LDS ACK recorded"
        )
        lds_sent_before = stage.lds_responses()
        write_policy(
            stage.policies, "blocked", port=blocked_port, version="v1", endpoints=[stage.backends.address("v2")]
        )
        wait_until(lambda: stage.proxy()["nacks"] >= 1, 15, what="Envoy to NACK the listener it cannot bind")
        proxy = stage.proxy()
        nack = proxy["last_nack"]
        print(f"\nNACK recorded by the plane: type={nack.type_url} version={nack.version}\n  {nack.message}")
        assert nack.type_url == typeurls.LISTENER
        assert f"127.0.0.1:{blocked_port}" in nack.message
        assert "cannot bind" in nack.message or "Address already in use" in nack.message, nack.message
        assert proxy["acked_versions"][typeurls.LISTENER] == lds_before  # Envoy stays on its last good LDS
        assert stage.envoy.stats().get("listener_manager.lds.update_rejected") == 1

        # Envoy keeps serving the first rollout.
        counts = send_requests(stage.port, HOST, 200)
        assert counts == {"v1": 200, "failed": 0}, counts

        # An unrelated change (shop gets a canary: CDS, EDS and RDS, but no LDS change) is pushed and
        # ACKed; the rejected listener is not sent again meanwhile.
        traffic = TrafficPlan(stage.backend("v1"), stage.backend("v2"), 50)
        stage.set_traffic(traffic)
        stage.wait_acked(traffic)
        stage.wait_envoy_weights({"v1": 50, "v2": 50})
        counts = send_requests(stage.port, HOST, 200)
        after = stage.proxy()
        stats = stage.envoy.stats()
        lds_sent = stage.lds_responses()
        print(
            f"after an unrelated change was ACKed: plane nacks={after['nacks']}, Envoy "
            f"lds.update_rejected={stats.get('listener_manager.lds.update_rejected')} "
            f"lds.update_attempt={stats.get('listener_manager.lds.update_attempt')}; plane LDS responses "
            f"{lds_sent_before} -> {lds_sent}; requests {counts}"
        )
        assert after["nacks"] == 1
        assert after["stream_id"] == proxy["stream_id"]  # same stream, no reconnect in between
        assert stats.get("listener_manager.lds.update_rejected") == 1
        # One LDS push: the NACKed one. Counted by the plane: Envoy's update_attempt counts a delta push twice.
        assert lds_sent == lds_sent_before + 1
        assert counts["failed"] == 0 and counts.get("v1", 0) + counts.get("v2", 0) == 200, counts
        assert f"listener-127.0.0.1-{blocked_port}" not in stage.envoy.listener_names()
        assert f"listener-127.0.0.1-{stage.port}" in stage.envoy.listener_names()
    finally:
        holder.close()


def test_control_plane_restart_under_load(stage: Stage, loadgen_factory: LoadgenFactory) -> None:
    traffic = TrafficPlan(stage.backend("v1"), stage.backend("v2"), 30)
    stage.set_traffic(traffic)
    stage.wait_envoy_weights({"v1": 70, "v2": 30})
    stage.wait_acked(traffic)
    before = _route_dump(stage.envoy, stage.route)
    xds_port = stage.cp.xds_port

    lg = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=4, rate_per_client=80)
    lg.wait_for_requests(200)

    def reapply(plane: ControlPlane) -> None:
        plane.director.set_desired_traffic(NAME, traffic)

    t0 = time.monotonic()
    stage.cp.restart(hook=reapply)
    restarted = time.monotonic() - t0
    serving_at = time.time()
    assert stage.cp.xds_port == xds_port
    proxy = wait_until(stage.proxy, 30, interval=0.02, what="Envoy to reconnect to the restarted plane")
    reconnected = time.monotonic() - t0
    after_serve = proxy["connected_at"] - serving_at
    stage.wait_acked(traffic)
    acked = time.monotonic() - t0
    lg.wait_for_requests(200)
    result = lg.stop()
    after = _route_dump(stage.envoy, stage.route)

    print(
        f"\nrestart (stop with 0.5 s grace + load + serve) took {restarted:.2f} s; Envoy reconnected "
        f"{reconnected:.2f} s after the restart began ({after_serve:.2f} s after the new plane listened), "
        f"route ACKed again at {acked:.2f} s"
        f"\nloadgen {result.total} requests {result.by_version}, failed {result.failed}"
        f"\nroute version before {before['version_info']} after {after['version_info']}"
    )
    assert result.failed == 0, (result.failures, _envoy_5xx(stage.envoy))
    assert stage.envoy_weights() == {f"{NAME}_v1": 70, f"{NAME}_v2": 30}
    assert stage.cp.call(lambda p: p.director.desired(NAME)) == traffic  # nothing in the new plane undid it
    assert before["version_info"] == after["version_info"] or before["route_config"] == after["route_config"]
    assert before["route_config"] == after["route_config"]
    assert reconnected < 30


def _envoy_5xx(envoy: EnvoyProcess) -> dict[str, int]:
    """Envoy's own count of locally or upstream-caused 5xx, and of requests routed to a missing cluster."""
    return {
        k: v
        for k, v in envoy.stats().items()
        if v and k.startswith("http.listener-") and k.endswith((".downstream_rq_5xx", ".no_cluster", ".no_route"))
    }


def _route_dump(envoy: EnvoyProcess, route: str) -> dict[str, Any]:
    for cfg in envoy.config_dump()["configs"]:
        if str(cfg.get("@type", "")).endswith(".RoutesConfigDump"):
            for entry in cfg.get("dynamic_route_configs", []):
                if entry.get("route_config", {}).get("name") == route:
                    return {"version_info": entry.get("version_info"), "route_config": entry["route_config"]}
    raise AssertionError(f"route configuration {route} not in Envoy's config_dump")
