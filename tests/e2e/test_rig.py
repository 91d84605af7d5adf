"""Self-test of the process rig (no control plane needed)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import EnvoyFactory, LoadgenFactory, PrometheusFactory
from tests.rig.backends import Backends
from tests.rig.grpc_backend import GrpcBackends, call_version
from tests.rig.loadgen import send_requests
from tests.rig.ports import free_port, free_ports, port_open
from tests.rig.simple_http import http_request
from tests.rig.waiting import async_wait_until, wait_until

pytestmark = pytest.mark.e2e


def test_wait_until_times_out_with_a_clear_message() -> None:
    with pytest.raises(TimeoutError, match="waiting for the impossible"):
        wait_until(lambda: False, 0.2, what="the impossible")
    assert wait_until(lambda: 42, 1.0) == 42


async def test_async_wait_until_accepts_async_predicates() -> None:
    calls = 0

    async def third_time_lucky() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    assert await async_wait_until(third_time_lucky, 2.0, interval=0.01)
    with pytest.raises(TimeoutError, match="never"):
        await async_wait_until(lambda: None, 0.1, what="never")


def test_free_ports_are_distinct_and_closed() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert not any(port_open(p) for p in ports)


def test_backends_answer_with_their_version_and_obey_behaviour(backends: Backends) -> None:
    ports = backends.start(["v1", "v2"])
    for version, port in ports.items():
        resp = http_request(port, "/")
        assert (resp.status, resp.body, resp.headers["x-version"]) == (200, version, version)

    backends.set_behaviour("v1", error_rate=1.0)
    resp = http_request(ports["v1"], "/")
    assert resp.status == 500 and resp.headers["x-version"] == "v1"
    assert http_request(ports["v2"], "/").status == 200  # other ports unaffected

    backends.set_behaviour("v1", error_rate=0.0, latency_ms=300)
    t0 = time.monotonic()
    resp = http_request(ports["v1"], "/")
    assert resp.status == 200 and time.monotonic() - t0 >= 0.29
    assert backends.counts() == {"v1": 3, "v2": 2}


def test_backends_answer_404s_and_export_orders_per_version(backends: Backends) -> None:
    """The behaviours behind tests/e2e/test_templates.py: a share of 404s, and orders counted
    exactly (0.25 per 200 is one order every fourth 200) on the version's own ``/metrics``."""
    ports = backends.start(["v1", "v2"])
    backends.set_behaviour("v2", client_error_rate=1.0)
    assert http_request(ports["v2"], "/").status == 404
    backends.set_behaviour("v2", client_error_rate=0.0, orders_per_request=0.5)
    for _ in range(8):
        assert http_request(ports["v1"], "/").status == 200
        assert http_request(ports["v2"], "/").status == 200
    v1, v2 = backends.metrics("v1"), backends.metrics("v2")
    assert 'orders_completed_total{version="v1"} 2\n' in v1  # 8 x 0.25
    assert 'orders_completed_total{version="v2"} 4\n' in v2  # 8 x 0.5; the 404 completed none
    assert 'shop_requests_total{version="v2",code="404"} 1\n' in v2
    assert 'shop_requests_total{version="v2",code="200"} 8\n' in v2
    assert backends.counts() == {"v1": 8, "v2": 9}  # scrapes of /metrics are not requests
    with pytest.raises(RuntimeError, match="add up to 1"):
        backends.set_behaviour("v2", error_rate=0.6, client_error_rate=0.6)


def test_send_requests_counts_by_body(backends: Backends) -> None:
    ports = backends.start(["v1"])
    assert send_requests(ports["v1"], "app.example.com", 500) == {"v1": 500, "failed": 0}
    backends.set_behaviour("v1", error_rate=1.0)
    assert send_requests(ports["v1"], "app.example.com", 10) == {"failed": 10}


def test_loadgen_against_a_backend(backends: Backends, loadgen_factory: LoadgenFactory) -> None:
    ports = backends.start(["v1", "v2"])
    lg = loadgen_factory(f"127.0.0.1:{ports['v2']}", "app.example.com", clients=4, rate_per_client=200)
    lg.wait_for_requests(300)
    result = lg.stop()
    assert result.failed == 0, result.failures
    assert result.total >= 300 and result.by_version == {"v2": result.total}
    assert result.first_status_5xx_at is None
    # Every request the load generator counted reached the backend.
    assert backends.counts()["v2"] == result.total


def test_loadgen_counts_5xx_and_connection_errors(
    backends: Backends, loadgen_factory: LoadgenFactory
) -> None:
    ports = backends.start(["v1"])
    backends.set_behaviour("v1", error_rate=1.0)
    lg = loadgen_factory(f"127.0.0.1:{ports['v1']}", "x", clients=2, rate_per_client=100)
    lg.wait_for_requests(20)
    backends.stop()
    wait_until(lambda: lg.snapshot().by_status.get("error", 0) >= 5, 10, what="connection errors")
    result = lg.stop()
    assert result.failed == result.total and result.by_version == {}
    assert result.first_status_5xx_at is not None and len(result.failures) == 20
    assert any("HTTP 500" in f for f in result.failures)


def test_envoy_without_control_plane_and_prometheus_scrape(
    envoy_factory: EnvoyFactory, prometheus_factory: PrometheusFactory
) -> None:
    envoy = envoy_factory(free_port())  # nothing listens on the xDS port
    assert envoy.admin_get("/ready").strip() in {"PRE_INITIALIZING", "INITIALIZING"}
    assert envoy.server_state() in {"PRE_INITIALIZING", "INITIALIZING"}
    assert envoy.listener_names() == set() and envoy.cluster_names() == set()
    assert envoy.route_weights("route-0.0.0.0-10000") == {}
    assert "cluster_manager.cds.update_attempt" in envoy.stats()

    prom = prometheus_factory([f"127.0.0.1:{envoy.admin_port}"])
    prom.wait_for_target_up()
    assert prom.query_value(f'up{{instance="127.0.0.1:{envoy.admin_port}"}}') == 1.0

    assert envoy.stop() == 0
    assert not envoy.alive and not port_open(envoy.admin_port)
    assert prom.stop() == 0


def test_grpc_backends(grpc_backends: GrpcBackends) -> None:
    import grpc

    ports = grpc_backends.start(["v1", "v2"])
    for version, port in ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert call_version(channel) == version
