"""A proxy's NACK rolls the canary back: a real Envoy rejects a resource of a running canary.

`aviary serve` (a subprocess, state in tmp, admin API on loopback) serves one Envoy. A canary of
`shop` runs at 30 % (steps 30/60, interval 1 h: nothing advances by itself). Then the policy gives
the canary version a second endpoint Envoy cannot parse: a link-local IPv6 address whose zone is
no interface (``[fe80::1%nosuchif]``). Python's ``ipaddress`` accepts any zone, so the schema
takes it and the cluster stays EDS: only the canary's ClusterLoadAssignment changes. Envoy rejects
that EDS update ("malformed IP address") and keeps the endpoints it had. The director maps the
NACK to the rollout (`TrafficDirector._report_nack`), the runner turns it into `ProxyNacked`
(`RolloutRunner._on_nack`) and the engine rolls the canary back.

What must hold, read from Envoy itself and from `aviary status`:
- Envoy's route goes from 70/30 to 100 % v1 and the canary's cluster leaves Envoy;
- the status is RolledBack with a reason naming the NACK and Envoy's message;
- Envoy rejected exactly one EDS update (its ``update_rejected`` counters sum to 1) and that stays so
  while later pushes (a new canary, v3, to 30 %) are ACKed: the rejected content is not resent;
- no request fails meanwhile (Envoy kept the canary's good endpoints until the route left it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.discovery.resources import cluster_name
from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.envoy import EnvoyProcess
from tests.rig.ports import free_ports
from tests.rig.serve_process import AviaryServe
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"
OLD, CANARY, NEXT = (cluster_name(NAME, v) for v in ("v1", "v2", "v3"))
# A link-local IPv6 address with a zone: a valid IP to Python's ipaddress, not to Envoy's EDS.
REJECTED_ENDPOINT = "[fe80::1%nosuchif]:9"


def rejected_updates(envoy: EnvoyProcess) -> dict[str, int]:
    """Every non-zero ``*.update_rejected`` counter of Envoy (CDS, LDS, RDS and each EDS cluster)."""
    return {k: v for k, v in envoy.stats().items() if k.endswith(".update_rejected") and v}


@dataclass
class Stage:
    workdir: Path
    backends: Backends
    policies: Path
    plane: AviaryServe
    envoy: EnvoyProcess
    port: int

    @property
    def route(self) -> str:
        return f"route-127.0.0.1-{self.port}"

    def write_policy(self, version: str, endpoints: list[str], steps: list[int] | None = None) -> None:
        spec: dict[str, Any] = {
            "listener": {"address": "127.0.0.1", "port": self.port},
            "hosts": [HOST],
            "version": version,
            "endpoints": endpoints,
        }
        if steps is not None:
            spec["strategy"] = {"steps": steps, "interval": "1h"}  # nothing advances by itself
        doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME}, "spec": spec}
        tmp = self.policies / f".{NAME}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.policies / f"{NAME}.yaml")  # the watcher never reads half a file

    def weights(self) -> dict[str, int]:
        return self.envoy.route_weights(self.route).get(NAME, {})

    def wait_weights(self, weights: dict[str, int], timeout: float = 15.0) -> None:
        wait_until(lambda: self.weights() == weights, timeout, what=f"Envoy route {weights}")

    def status(self) -> dict[str, Any]:
        """`aviary status shop -o json`, as an operator would read it."""
        rollout: dict[str, Any] = self.plane.cli_json("status", NAME)
        return rollout

    def nack_lines(self) -> list[str]:
        """The plane's "proxy NACKed" log lines (one per NACK it received)."""
        return [
            str(e.get("message"))
            for e in self.plane.log_entries()
            if str(e.get("message", "")).startswith("proxy NACKed")
        ]


@pytest.fixture
def stage(
    workdir: Path, backends: Backends, envoy_factory: EnvoyFactory, request: pytest.FixtureRequest
) -> Iterator[Stage]:
    backends.start(["v1", "v2", "v3"])
    policies = workdir / "policies"
    policies.mkdir()
    plane = AviaryServe(workdir / "aviary", policies, workdir / "state" / "aviary.db")
    (port,) = free_ports(1)
    try:
        stage = Stage(workdir, backends, policies, plane, None, port)  # type: ignore[arg-type]
        stage.write_policy("v1", [backends.address("v1")])
        plane.start()
        stage.envoy = envoy_factory(plane.xds_port, node_id=NODE)
        stage.envoy.wait_ready()
        stage.envoy.wait_for_listener(port)
        stage.wait_weights({OLD: 100})
        yield stage
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {plane.describe()}")
        plane.stop()


def test_envoy_nack_of_a_canary_resource_rolls_it_back(stage: Stage, loadgen_factory: LoadgenFactory) -> None:
    envoy = stage.envoy
    lg = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=2, rate_per_client=25.0)
    good = [stage.backends.address("v2")]
    stage.write_policy("v2", good, steps=[30, 60])
    stage.wait_weights({OLD: 70, CANARY: 30})
    wait_until(lambda: stage.status()["acked_weight"] == 30, 10, what="status: 30 % ACKed")
    assert rejected_updates(envoy) == {}, rejected_updates(envoy)
    lg.wait_for_requests(50)

    # The canary gets an endpoint Envoy rejects: only its EDS resource changes.
    changed_at = time.monotonic()
    stage.write_policy("v2", [*good, REJECTED_ENDPOINT], steps=[30, 60])
    wait_until(lambda: stage.weights() == {OLD: 100}, 15, interval=0.02, what="Envoy route back to 100 % v1")
    to_rollback = time.monotonic() - changed_at
    wait_until(lambda: CANARY not in envoy.cluster_names(), 15, what=f"{CANARY} gone from Envoy")
    status = stage.status()
    rejected = rejected_updates(envoy)
    nacks = stage.nack_lines()
    print(
        f"\n[nack-rollback] policy change -> Envoy 100 % v1 in {to_rollback:.3f}s; Envoy rejected {rejected}; "
        f"status phase={status['phase']} reason={status.get('reason')!r}; plane NACK lines {len(nacks)}"
    )
    assert status["phase"] == "RolledBack", status
    assert status.get("failed_version") == "v2", status
    reason = str(status.get("reason", ""))
    assert "NACK" in reason and NODE in reason and "malformed IP address" in reason, reason
    # One EDS update rejected. With ADS, Envoy counts it on the first cluster of the EDS response
    # (the stable one here), not necessarily on the cluster whose endpoints it could not parse.
    rejecting = {f"cluster.{c}.update_rejected" for c in (OLD, CANARY)}
    assert sum(rejected.values()) == 1 and set(rejected) <= rejecting, rejected
    assert len(nacks) == 1, nacks

    # Later pushes are ACKed and the rejected content is not sent again.
    stage.write_policy("v3", [stage.backends.address("v3")], steps=[30, 60])
    stage.wait_weights({OLD: 70, NEXT: 30})
    wait_until(lambda: stage.status()["acked_weight"] == 30, 10, what="status: v3 at 30 % ACKed")
    result = lg.stop()
    after = rejected_updates(envoy)
    print(
        f"[nack-rollback] after a later canary (v3 at 30 %): Envoy rejected {after}; requests {result.total}, "
        f"failed {result.failed}, by version {result.by_version}"
    )
    assert after == rejected, after
    assert len(stage.nack_lines()) == 1, stage.nack_lines()
    assert result.failed == 0, (result.failures, result.by_status)
    assert result.by_version.get("v2", 0) > 0  # the canary did take traffic before the rollback
