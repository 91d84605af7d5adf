"""A step's clock starts when every proxy has ACKed its weight, not when the weight is sent.

`aviary serve` (a subprocess) serves a real Envoy and, beside it, a fake proxy of the same node
cluster (tests/rig/gating_proxy.py) that ACKs everything except the route giving the canary 30 %.
A canary with steps 30/60 and a 2 s interval starts. Envoy applies 30 % at once; the fake proxy
holds its ACK for HOLD seconds (more than twice the interval), then releases it.

Envoy runs once with State-of-the-World ADS (GRPC), once incremental (DELTA_GRPC), and once without
ADS on the per-type discovery services (PER_TYPE: one stream per type, and per cluster for EDS,
which the engine must read as one proxy to know it ACKed the canary's cluster and endpoints).

What must hold, read from Envoy's own route (sampled every ~50 ms from /config_dump):
- while the fake proxy holds, Envoy stays at 30 % (a clock started at the push would have moved it
  to 60 % after 2 s) and `aviary status` says 30 % is not ACKed yet;
- 60 % reaches Envoy one interval after the release (not earlier: the clock starts at the ACK;
  not much later: the step then runs normally);
- the canary weight Envoy routes never goes down.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.discovery.resources import cluster_name
from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.envoy_sampler import EnvoySampler
from tests.rig.gating_proxy import GatingProxy
from tests.rig.ports import free_ports
from tests.rig.serve_process import AviaryServe
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
HOST = "shop.example.com"
OLD, CANARY = cluster_name(NAME, "v1"), cluster_name(NAME, "v2")
INTERVAL = 2.0  # seconds per step
HOLD = 5.0  # seconds the fake proxy withholds its ACK of 30 %: the scenario, longer than 2 intervals
# Slack for a loaded 2-core machine: the engine's timer, the push, Envoy's ACK, the 50 ms sampling.
LATE_BOUND = 3.0


def write_policy(policies: Path, port: int, version: str, endpoint: str, steps: list[int] | None = None) -> None:
    spec: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": port},
        "hosts": [HOST],
        "version": version,
        "endpoints": [endpoint],
    }
    if steps is not None:
        spec["strategy"] = {"steps": steps, "interval": f"{INTERVAL:g}s"}
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME}, "spec": spec}
    tmp = policies / f".{NAME}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(policies / f"{NAME}.yaml")


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC", "PER_TYPE"])
def test_step_clock_waits_for_every_proxy_to_ack(
    api_type: str,
    workdir: Path,
    backends: Backends,
    envoy_factory: EnvoyFactory,
    loadgen_factory: LoadgenFactory,
    request: pytest.FixtureRequest,
) -> None:
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    plane = AviaryServe(workdir / "aviary", policies, workdir / "state" / "aviary.db")
    (port,) = free_ports(1)
    route = f"route-127.0.0.1-{port}"
    gate = GatingProxy(plane.xds_port, route, CANARY, 30, node_id="gating-proxy")
    sampler: EnvoySampler | None = None
    try:
        write_policy(policies, port, "v1", backends.address("v1"))
        plane.start()
        envoy = envoy_factory(plane.xds_port, node_id="envoy-1", delta=api_type == "DELTA_GRPC", start=False)
        envoy.per_type = api_type == "PER_TYPE"
        envoy.start()
        envoy.wait_ready()
        envoy.wait_for_listener(port)
        wait_until(lambda: envoy.route_weights(route).get(NAME) == {OLD: 100}, 10, what="Envoy at 100 % v1")
        gate.start()
        wait_until(lambda: gate.stats().acks.get("RDS"), 10, what="the gating proxy to ACK the route to v1")
        lg = loadgen_factory(f"127.0.0.1:{port}", HOST, clients=2, rate_per_client=25.0)
        sampler = EnvoySampler(envoy, route, NAME).start()

        write_policy(policies, port, "v2", backends.address("v2"), steps=[30, 60])
        wait_until(lambda: envoy.route_weights(route).get(NAME) == {OLD: 70, CANARY: 30}, 15, what="Envoy at 30 %")
        wait_until(gate.holding, 10, what="the gating proxy to hold its ACK of 30 %")
        seen_30 = sampler.first_at
        at_30 = wait_until(lambda: seen_30(CANARY, 30), 5, what="a sample of Envoy at 30 %")
        assert at_30 is not None
        # The scenario: the fake proxy withholds its ACK for HOLD seconds. Envoy must stay at 30 %.
        while time.time() - at_30 < HOLD:
            assert envoy.route_weights(route).get(NAME) == {OLD: 70, CANARY: 30}, sampler.changes(CANARY, at_30)
            time.sleep(0.1)
        held_status = plane.cli_json("status", NAME)
        released_at = gate.release()
        wait_until(
            lambda: envoy.route_weights(route).get(NAME) == {OLD: 40, CANARY: 60}, INTERVAL + 15,
            what="Envoy at 60 % after the release",
        )  # fmt: skip
        started_status = plane.cli_json("status", NAME)
        result = lg.stop()
    finally:
        if sampler is not None:
            sampler.stop()
        gate.stop()
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {plane.describe()}\n===== {gate.describe()}")
        plane.stop()

    at_60 = sampler.first_at(CANARY, 60)
    assert at_60 is not None
    release_to_60 = at_60 - released_at
    seconds_at_30 = sampler.time_at(CANARY, 30)
    print(
        f"\n[ack-gating] Envoy at 30 % for {seconds_at_30:.2f}s (held {HOLD:g}s + interval {INTERVAL:g}s); "
        f"release -> Envoy 60 % in {release_to_60:.3f}s; status while held: weight={held_status['weight']} "
        f"acked_weight={held_status.get('acked_weight')} reason={held_status['reason']!r}; after: "
        f"{started_status['reason']!r}; requests {result.total} failed {result.failed}; samples "
        f"{len(sampler.samples)} errors {sampler.errors}"
    )
    assert held_status["phase"] == "Progressing" and held_status["weight"] == 30, held_status
    assert held_status.get("acked_weight") != 30, held_status  # the engine knows 30 % is not applied everywhere
    assert INTERVAL - 0.3 <= release_to_60 <= INTERVAL + LATE_BOUND, (release_to_60, sampler.changes(CANARY, at_30))
    assert seconds_at_30 >= HOLD + INTERVAL - 0.3, sampler.changes(CANARY, at_30)
    assert sampler.decreases(CANARY) == [], sampler.changes(CANARY, at_30)
    assert result.failed == 0, (result.failures, result.by_status)
