"""Proxyless gRPC end to end: a grpcio client on ``xds:///<rollout>`` served by aviary.app.ControlPlane.

The client runs in its own process (tests/rig/grpc_xds_client.py) so that ``GRPC_XDS_BOOTSTRAP``
and gRPC's process-global xDS client stay out of the pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aviary.discovery import typeurls
from aviary.discovery.proxy_events import ProxyEvent, ResourcesAcked, ResourcesNacked, SubscriptionChanged
from aviary.matching import CohortRule, Condition, Match
from aviary.policy.schema import Endpoint
from aviary.traffic import Backend, Stickiness, TrafficPlan
from tests.conftest import ControlPlaneFactory
from tests.rig.control_plane import RunningControlPlane, write_policy
from tests.rig.grpc_backend import GrpcBackends
from tests.rig.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CLIENT_SCRIPT = Path(__file__).resolve().parents[1] / "rig" / "grpc_xds_client.py"
NAME = "greeter"
RPCS = 500


def _serving_v1(workdir: Path, grpc_backends: GrpcBackends,
                control_plane_factory: ControlPlaneFactory) -> RunningControlPlane:
    """gRPC backends v1 and v2, and a control plane serving ``NAME`` at v1 from a policy file."""
    grpc_backends.start(["v1", "v2"])
    policies = workdir / "policies"
    # The listener port is where an Envoy would serve this rollout; the gRPC client never uses it.
    write_policy(policies, NAME, port=free_port(), version="v1", endpoints=[grpc_backends.address("v1")])
    return control_plane_factory(policies)


def _backend_of(grpc_backends: GrpcBackends) -> Callable[[str], Backend]:
    """``backend(version)``: the traffic layer's Backend for that gRPC backend."""

    def backend(version: str) -> Backend:
        return Backend(version, (Endpoint.model_validate(grpc_backends.address(version)),))

    return backend


def _bootstrap(path: Path, xds_port: int, node_id: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{xds_port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": node_id, "cluster": "grpc-clients", "locality": {}},
            }
        )
    )
    return path


def test_proxyless_client_follows_the_weighted_split(
    workdir: Path, grpc_backends: GrpcBackends, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = _serving_v1(workdir, grpc_backends, control_plane_factory)
    backend = _backend_of(grpc_backends)

    traffic = TrafficPlan(backend("v1"), backend("v2"), canary_weight=20)
    cp.call(lambda p: p.director.set_desired_traffic(NAME, traffic))
    assert cp.call(lambda p: p.director.published_route(NAME)) == {"v1": 80, "v2": 20}

    events: list[tuple[str, bool, frozenset[str]]] = []

    def record(event: ProxyEvent) -> None:  # runs on the plane's loop
        if isinstance(event, SubscriptionChanged):
            events.append((event.type_url, event.wildcard, frozenset(event.names)))

    cp.call(lambda p: p.proxies.subscribe(record))

    bootstrap = _bootstrap(workdir / "grpc-xds-bootstrap.json", cp.xds_port, "grpc-client-1")
    proc = subprocess.run(
        [sys.executable, CLIENT_SCRIPT, "--bootstrap", bootstrap, "--target", f"xds:///{NAME}", "--rpcs", str(RPCS)],
        capture_output=True,
        text=True,
        timeout=60,  # kills the client if it hangs
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    by_version: dict[str, int] = result["by_version"]
    share = 100 * by_version.get("v2", 0) / RPCS

    acks, subscriptions = cp.call(lambda p: (len(p.proxies.push_ack_latencies), list(events)))
    print(
        f"\nproxyless gRPC at canary weight 20: {by_version}, failed {result['failed']} -> v2 {share:.1f} %"
        f"\nfirst RPC (xDS fetch) after {result['first_rpc_s']:.2f} s, {RPCS} RPCs in {result['total_s']:.2f} s; "
        f"plane recorded {acks} ACKs"
    )
    assert result["failed"] == 0, result["errors"]
    assert sum(by_version.values()) == RPCS and set(by_version) == {"v1", "v2"}, by_version
    assert 14.0 <= share <= 26.0, by_version
    assert acks >= 4  # LDS, RDS, CDS, EDS each ACKed at least once
    # It asked by name for the api_listener `<rollout>` and the route configuration `grpc-<rollout>`.
    assert (typeurls.LISTENER, False, frozenset({NAME})) in subscriptions, subscriptions
    assert (typeurls.ROUTE, False, frozenset({f"grpc-{NAME}"})) in subscriptions, subscriptions


def _run_client(bootstrap: Path, rpcs: int, headers: dict[str, str]) -> dict[str, Any]:
    extra = [arg for name, value in headers.items() for arg in ("--header", f"{name}={value}")]
    proc = subprocess.run(
        [sys.executable, CLIENT_SCRIPT, "--bootstrap", bootstrap, "--target", f"xds:///{NAME}", "--rpcs", str(rpcs),
         *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_proxyless_client_gets_cohorts_by_header_and_cookie(
    workdir: Path, grpc_backends: GrpcBackends, control_plane_factory: ControlPlaneFactory
) -> None:
    """gRPC's xDS client honours the cohort routes: metadata `x-team: qa` or a `cookie` with beta=1
    reaches the canary at weight 0; calls without them stay on stable."""
    cp = _serving_v1(workdir, grpc_backends, control_plane_factory)
    backend = _backend_of(grpc_backends)

    internal = CohortRule("internal", (Match(headers=(("x-team", Condition("exact", "qa")),)),
                                       Match(cookies=(("beta", Condition("exact", "1")),))))
    plan = TrafficPlan(backend("v1"), backend("v2"), canary_weight=0, cohorts=(internal,))
    cp.call(lambda p: p.director.set_desired_traffic(NAME, plan))
    bootstrap = _bootstrap(workdir / "grpc-xds-bootstrap.json", cp.xds_port, "grpc-client-1")
    seen = {
        kind: _run_client(bootstrap, 100, headers)
        for kind, headers in {"plain": {}, "header": {"x-team": "qa"}, "cookie": {"cookie": "a=b; beta=1"},
                              "cookie beta=10": {"cookie": "beta=10"}}.items()
    }
    print(f"\nproxyless gRPC at weight 0 with cohort internal: { {k: r['by_version'] for k, r in seen.items()} }")
    assert all(r["failed"] == 0 for r in seen.values()), {k: r["errors"] for k, r in seen.items()}
    assert seen["plain"]["by_version"] == {"v1": 100}
    assert seen["header"]["by_version"] == {"v2": 100}
    assert seen["cookie"]["by_version"] == {"v2": 100}
    assert seen["cookie beta=10"]["by_version"] == {"v1": 100}


@pytest.mark.parametrize("stickiness", [Stickiness(header="x-user-id"), Stickiness(cookie="session", ttl=86400.0)],
                         ids=["header", "cookie"])
def test_proxyless_client_gets_plain_weights_from_a_sticky_plan_and_skips_query_cohorts(
    workdir: Path, grpc_backends: GrpcBackends, control_plane_factory: ControlPlaneFactory, stickiness: Stickiness
) -> None:
    """What gRPC's xDS client does with what it does not implement: it ACKs the sticky route (hash
    policy, `use_hash_policy`, the cookie-issuing route) and a cohort with a query-parameter
    condition, then splits by the plain weights (one user id sees both versions) and skips the
    query route (a gRPC call has no query string): no NACK, no failed call."""
    cp = _serving_v1(workdir, grpc_backends, control_plane_factory)
    backend = _backend_of(grpc_backends)

    events: list[ProxyEvent] = []
    cp.call(lambda p: p.proxies.subscribe(lambda event: events.append(event)))
    beta = CohortRule("beta", (Match(query=(("beta", Condition("exact", "1")),)),))
    plan = TrafficPlan(backend("v1"), backend("v2"), canary_weight=50, cohorts=(beta,), stickiness=stickiness)
    cp.call(lambda p: p.director.set_desired_traffic(NAME, plan))
    bootstrap = _bootstrap(workdir / "grpc-xds-bootstrap.json", cp.xds_port, "grpc-client-1")
    one_user = _run_client(bootstrap, 200, {"x-user-id": "user-7", "cookie": "session=abc"})
    no_key = _run_client(bootstrap, 200, {})
    seen = cp.call(lambda p: list(events))
    nacks = [e for e in seen if isinstance(e, ResourcesNacked)]
    route_acks = [e for e in seen if isinstance(e, ResourcesAcked) and e.type_url == typeurls.ROUTE
                  and f"grpc-{NAME}" in e.resources]
    print(f"\nproxyless gRPC at weight 50, sticky by {stickiness.describe()}, query cohort beta: "
          f"one user {one_user['by_version']}, no key {no_key['by_version']}, NACKs {len(nacks)}")
    assert nacks == [], nacks
    assert len(route_acks) >= 2, seen  # one per client run
    assert one_user["failed"] == 0 and no_key["failed"] == 0, (one_user["errors"], no_key["errors"])
    # Plain weights: the same user id reaches both versions (Envoy would keep it on one), and the
    # query route is not taken (were its condition ignored instead, every call would reach v2).
    for result in (one_user, no_key):
        assert set(result["by_version"]) == {"v1", "v2"}, result["by_version"]
        assert 70 <= result["by_version"]["v2"] <= 130, result["by_version"]  # 200 RPCs at 50 %: sd 7


def test_proxyless_client_accepts_a_mirroring_route_and_makes_no_copies(
    workdir: Path, grpc_backends: GrpcBackends, control_plane_factory: ControlPlaneFactory
) -> None:
    """gRPC's xDS client does not implement `request_mirror_policies`: it ACKs a route carrying
    one (no NACK, which would roll the canary back) and ignores it, so in a mirror step a proxyless
    client's calls follow the weights only and the canary gets no copies."""
    cp = _serving_v1(workdir, grpc_backends, control_plane_factory)
    backend = _backend_of(grpc_backends)

    plan = TrafficPlan(backend("v1"), backend("v2"), canary_weight=0, mirror=100)
    cp.call(lambda p: p.director.set_desired_traffic(NAME, plan))
    route_events: list[ProxyEvent] = []

    def record(event: ProxyEvent) -> None:  # runs on the plane's loop
        if isinstance(event, ResourcesAcked | ResourcesNacked) and event.type_url == typeurls.ROUTE:
            route_events.append(event)

    cp.call(lambda p: p.proxies.subscribe(record))
    v2_before = grpc_backends.served("v2")
    bootstrap = _bootstrap(workdir / "grpc-xds-bootstrap.json", cp.xds_port, "grpc-client-1")
    result = _run_client(bootstrap, 100, {})
    copies = grpc_backends.served("v2") - v2_before
    events = cp.call(lambda p: list(route_events))
    print(f"\nproxyless gRPC at weight 0, mirror 100 %: {result['by_version']}, failed {result['failed']}, "
          f"copies at v2 {copies}, route ACKs {sum(isinstance(e, ResourcesAcked) for e in events)}, "
          f"NACKs {[e.message for e in events if isinstance(e, ResourcesNacked)]}")
    assert not [e for e in events if isinstance(e, ResourcesNacked)], events
    assert any(isinstance(e, ResourcesAcked) and f"grpc-{NAME}" in e.resources for e in events), events
    assert result["failed"] == 0, result["errors"]
    assert result["by_version"] == {"v1": 100}
    assert copies == 0
