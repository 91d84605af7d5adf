"""How fast a rollout reacts through a real Envoy and a real Prometheus (part of `make bench`).

The README's rollback and promotion figures are quoted from what this measures, never kept by hand:
  - rollback: a canary answering 500 to 30 % of requests; from the first 500 a client saw to the
    canary's weight 0 in Envoy's own route configuration (`/config_dump`), over several runs;
  - promotion: a healthy canary with steps 20/50 and a 4 s interval; from the policy write to the
    canary's 100 % in Envoy.
Prometheus scrapes Envoy every 1 s; checks run every 1 s over a 5 s window (as in the e2e tests).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from aviary.discovery.resources import cluster_name, route_name
from aviary.policy.schema import ListenerSpec
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane
from tests.rig.envoy import EnvoyProcess
from tests.rig.loadgen import LoadGenerator
from tests.rig.ports import free_port, port_open
from tests.rig.prometheus import PrometheusProcess
from tests.rig.waiting import wait_until

ROLLBACK_RUNS = 5
HOST = "app.example.com"
POLL = 0.02  # how often Envoy's route is read: the resolution of every figure here


class Rig:
    def __init__(self, base: Path, reports: bool = False) -> None:
        self.base = base
        self.reports = reports  # Envoy's metrics service sink to Aviary too (the envoy provider)
        self.policies = base / "policies"
        self.policies.mkdir()
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Rig:
        plane = RunningControlPlane(self.policies, poll_interval=0.2).start()
        self.stack.callback(plane.stop)
        self.envoy = EnvoyProcess(self.base / "envoy", plane.xds_port, reports=self.reports).start()
        self.stack.callback(self.envoy.stop)
        self.prometheus = PrometheusProcess(self.base / "prometheus", [f"127.0.0.1:{self.envoy.admin_port}"], "1s")
        self.prometheus.start()
        self.stack.callback(self.prometheus.stop)
        self.prometheus.wait_for_target_up(timeout=30)
        self.backends = Backends(self.base / "backends")
        self.backends.start(["v1", "v2"])
        self.stack.callback(self.backends.stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def write(self, name: str, port: int, version: str, **spec: Any) -> float:
        """Write the policy atomically; returns the wall clock of the rename."""
        doc = {
            "apiVersion": "aviary.dev/v1",
            "kind": "Rollout",
            "metadata": {"name": name},
            "spec": {
                "listener": {"address": "127.0.0.1", "port": port},
                "hosts": ["*"],
                "version": version,
                "endpoints": [self.backends.address(version)],
                **spec,
            },
        }
        tmp = self.policies / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        written = time.time()
        tmp.replace(self.policies / f"{name}.yaml")
        return written

    def canary_weight(self, name: str, port: int) -> int:
        route = route_name(ListenerSpec(address="127.0.0.1", port=port))
        return self.envoy.route_weights(route).get(name, {}).get(cluster_name(name, "v2"), 0)

    @contextlib.contextmanager
    def serving_v1(self, name: str) -> Iterator[tuple[int, LoadGenerator]]:
        port = free_port()
        self.write(name, port, "v1")
        route = route_name(ListenerSpec(address="127.0.0.1", port=port))
        wait_until(
            lambda: self.envoy.route_weights(route).get(name) == {cluster_name(name, "v1"): 100} and port_open(port),
            15, what=f"Envoy to serve {name}",
        )  # fmt: skip
        load = LoadGenerator(f"127.0.0.1:{port}", HOST, 4, self.base / f"load-{name}", rate_per_client=40).start()
        try:
            load.wait_for_requests(40, timeout=15)
            yield port, load
        finally:
            load.stop()
            (self.policies / f"{name}.yaml").unlink(missing_ok=True)

    def analysis(self) -> dict[str, Any]:
        return {
            "prometheus": self.prometheus.url, "checkEvery": "1s", "window": "5s", "minRequests": 5,
            "failureLimit": 0, "inconclusiveLimit": 10,
            "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}],
        }  # fmt: skip


def _poll_until(condition: Callable[[], bool], timeout: float) -> float:
    """Wall clock of the first poll at which ``condition`` held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return time.time()
        time.sleep(POLL)  # pacing of the poll, not synchronisation
    raise TimeoutError(f"not within {timeout}s")


def rollback_run(rig: Rig, run: int, analysis: dict[str, Any] | None = None, name: str = "fail") -> float:
    """Seconds from the canary's first 500 to its weight 0 at Envoy (``analysis``: the rig's by default)."""
    name = f"{name}{run}"
    rig.backends.set_behaviour("v2", error_rate=0.3)
    with rig.serving_v1(name) as (port, load):
        rig.write(name, port, "v2", strategy={"steps": [20, 50], "interval": "20s"},
                  analysis=analysis if analysis is not None else rig.analysis())
        _poll_until(lambda: rig.canary_weight(name, port) > 0, 20)
        zero_at = _poll_until(lambda: rig.canary_weight(name, port) == 0, 30)
        first_5xx = load.snapshot().first_status_5xx_at
        assert first_5xx is not None, "the canary never failed a request"
        return zero_at - first_5xx


def promotion_run(rig: Rig) -> float:
    name = "healthy"
    rig.backends.set_behaviour("v2", error_rate=0.0)
    with rig.serving_v1(name) as (port, _load):
        written = rig.write(name, port, "v2", strategy={"steps": [20, 50], "interval": "4s"}, analysis=rig.analysis())
        return _poll_until(lambda: rig.canary_weight(name, port) == 100 or _only_v2(rig, name, port), 60) - written


def _only_v2(rig: Rig, name: str, port: int) -> bool:
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    return rig.envoy.route_weights(route).get(name) == {cluster_name(name, "v2"): 100}


def bench_reaction() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aviary-bench-") as base, Rig(Path(base)) as rig:
        rollbacks = [rollback_run(rig, run) for run in range(ROLLBACK_RUNS)]
        promotion = promotion_run(rig)
    return {
        "rollback_first_5xx_to_envoy_0_s": {
            "runs": ROLLBACK_RUNS,
            "median": round(statistics.median(rollbacks), 2),
            "min": round(min(rollbacks), 2),
            "max": round(max(rollbacks), 2),
        },
        "promotion_write_to_envoy_100_s": round(promotion, 2),
        "setup": "real Envoy and Prometheus (1 s scrape), checkEvery 1s, window 5s, steps 20/50",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_reaction(), indent=2))
