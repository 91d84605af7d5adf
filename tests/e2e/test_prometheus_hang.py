"""A Prometheus that accepts connections and never answers, through a real Envoy.

Before the fix each check round waited the full HTTP timeout (5 s) and the next round was due
``checkEvery`` after the answer came back, so four inconclusive rounds (``inconclusiveLimit: 3``
tolerates three) took about 24 s at ``checkEvery: 1s``. Now every query gets
``min(5 s, max(0.5 s, 0.8 x checkEvery))`` = 0.8 s and rounds start ``checkEvery`` apart: rounds at
1, 2, 3 and 4 s after the step started, the fourth giving up at about 4.8 s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.discovery.resources import cluster_name, route_name
from aviary.policy.rollout_state import Hold, Phase, RolloutStatus
from aviary.policy.schema import ListenerSpec
from tests.conftest import ControlPlaneFactory, EnvoyFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane
from tests.rig.envoy import EnvoyProcess
from tests.rig.ports import free_port
from tests.rig.silent_server import SilentServer
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
CHECK_EVERY = 1.0
INCONCLUSIVE_LIMIT = 3
# (limit + 1) rounds checkEvery apart, the last one cut at 0.8 s, plus room for a busy machine.
# The old behaviour took about 24 s.
BOUND = (INCONCLUSIVE_LIMIT + 1) * CHECK_EVERY + 0.8 + 2.0
QUERIES = 3  # distinct queries per round: the canary's request count, success rate and p99


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def write_rollout(policies: Path, port: int, version: str, endpoints: list[str], **spec: Any) -> None:
    doc = {
        "apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME},
        "spec": {"listener": {"address": "127.0.0.1", "port": port}, "hosts": ["*"], "version": version,
                 "endpoints": endpoints, **spec},
    }
    tmp = policies / f".{NAME}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(policies / f"{NAME}.yaml")  # the watcher never reads half a file


def canary_weight(envoy: EnvoyProcess, route: str) -> int:
    return envoy.route_weights(route).get(NAME, {}).get(cluster_name(NAME, "v2"), 0)


@pytest.mark.parametrize("on_inconclusive", ["rollback", "pause"])
def test_a_hanging_prometheus_ends_the_canary_in_rounds_of_check_every(
    workdir: Path, backends: Backends, control_plane_factory: ControlPlaneFactory, envoy_factory: EnvoyFactory,
    silent: SilentServer, on_inconclusive: str,
) -> None:
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    plane: RunningControlPlane = control_plane_factory(policies)
    envoy = envoy_factory(plane.xds_port)
    envoy.wait_ready()
    port = free_port()
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    write_rollout(policies, port, "v1", [backends.address("v1")])
    envoy.wait_rollout_weights(route, NAME, {"v1": 100}, 15)

    analysis = {
        "prometheus": silent.url, "checkEvery": f"{CHECK_EVERY:g}s", "window": "5s", "minRequests": 1,
        "inconclusiveLimit": INCONCLUSIVE_LIMIT, "onInconclusive": on_inconclusive,
        "metrics": [{"name": "success", "template": "request-success-rate", "min": 99},
                    {"name": "p99", "template": "request-duration-p99", "max": 500}],
    }
    write_rollout(policies, port, "v2", [backends.address("v2")],
                  strategy={"steps": [20, 50], "interval": "1h"}, analysis=analysis)
    wait_until(lambda: canary_weight(envoy, route) == 20, 15, interval=0.01, what="the canary at 20 % in Envoy")
    at_envoy = time.monotonic()

    def status() -> RolloutStatus:
        found = plane.call(lambda p: p.runner.status(NAME))
        assert found is not None
        return found

    if on_inconclusive == "rollback":
        wait_until(lambda: canary_weight(envoy, route) == 0, 60, interval=0.01, what="the rollback in Envoy")
        took = time.monotonic() - at_envoy
        assert status().phase is Phase.ROLLED_BACK
        envoy.wait_rollout_weights(route, NAME, {"v1": 100}, 5)
    else:
        wait_until(lambda: status().phase is Phase.PAUSED, 60, interval=0.01, what="the pause")
        took = time.monotonic() - at_envoy
        assert status().hold is Hold.INCONCLUSIVE
        assert canary_weight(envoy, route) == 20  # paused where it was
    final = status()
    print(f"silent Prometheus, checkEvery {CHECK_EVERY:g}s, inconclusiveLimit {INCONCLUSIVE_LIMIT}: "
          f"{on_inconclusive} {took:.2f}s after Envoy had the canary (bound {BOUND:g}s); reason: {final.reason}")
    assert f"inconclusive ({INCONCLUSIVE_LIMIT + 1}) > inconclusiveLimit ({INCONCLUSIVE_LIMIT})" in final.reason
    # Timed out; or, on a machine so busy that the last round's thread had not given up yet, not sent again.
    expected = rf"request count: Prometheus {re.escape(silent.url)} (timed out after 0\.8s|has not answered .*)"
    assert all(re.fullmatch(expected, c.reason) for c in final.last_checks), final.last_checks
    assert took < BOUND
    if on_inconclusive == "rollback":
        # No more rounds; each round's connections were closed when it gave up: nothing piles up.
        wait_until(lambda: silent.open == 0, 5, what="every connection to the silent Prometheus to close")
        assert INCONCLUSIVE_LIMIT + 1 <= silent.accepted <= (INCONCLUSIVE_LIMIT + 1) * QUERIES
    else:
        # Paused, the rounds go on (a Resume needs fresh data): never more than one round's queries open.
        most_open = [0]

        def more_rounds() -> bool:
            most_open[0] = max(most_open[0], silent.open)
            return silent.accepted >= (INCONCLUSIVE_LIMIT + 3) * QUERIES

        wait_until(more_rounds, 10, interval=0.01, what="two more rounds while paused")
        assert most_open[0] <= QUERIES, most_open
    print(f"connections made to the silent Prometheus: {silent.accepted}, {QUERIES} per round")
