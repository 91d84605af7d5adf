"""A restart that outlasts a step: the restarted plane must wait for Envoy before it promotes.

`aviary serve --state FILE --log-format json` serves one Envoy under unthrottled load (several
clients, for a bounded time). A canary with ``steps: [50]`` and a 2 s interval starts; once its
step has started (Envoy routes 50 %, the step's start persisted), the plane is killed with SIGKILL
and kept down ~6 s: longer than the step's remaining time, so Envoy's reconnect backoff grows.
Then it is started again with the same arguments and ``--reconnect-grace 30``.

The step's time is up when the new process starts. Before the fix in the director
(``expect_proxies``), a plane with no proxy connected had every gate open: it promoted at once and
removed ``shop_v1`` while Envoy, reconnecting seconds later, still routed to it (503, ``no_cluster``).

What must hold: no failed request and Envoy's ``no_cluster`` stays 0; Envoy itself took the restored
50 % route from the new process (its RDS ``update_success`` counter rose after the restart while its
route still said 50/50) before the promotion's route reached it; in the new process's log, Envoy's
"proxy connected" line precedes any transition to Promoting or Stable; and the rollout completes
(100 % v2, ``shop_v1`` gone from Envoy). Timings go to ``tests/e2e/.results/restart_gap.json``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.discovery.resources import cluster_name
from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.envoy import EnvoyProcess
from tests.rig.envoy_sampler import EnvoySample, EnvoySampler
from tests.rig.ports import free_ports
from tests.rig.serve_process import AviaryServe, saved_rollout
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"
OLD, CANARY = cluster_name(NAME, "v1"), cluster_name(NAME, "v2")
CLIENTS = 4
DOWNTIME = 6.0  # seconds the plane stays dead: longer than the 2 s step
RESULTS_FILE = Path(__file__).resolve().parent / ".results" / "restart_gap.json"
TRANSITION = re.compile(rf"^rollout {NAME}: (\S+) -> (\S+), ")
RDS_SUCCESS = r"\.rds\.route-.*\.update_success$"  # Envoy's counter of RDS updates it accepted


def write_policy(policies: Path, port: int, version: str, endpoint: str, strategy: dict[str, Any] | None) -> None:
    spec: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": port},
        "hosts": [HOST],
        "version": version,
        "endpoints": [endpoint],
    }
    if strategy:
        spec["strategy"] = strategy
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME}, "spec": spec}
    tmp = policies / f".{NAME}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(policies / f"{NAME}.yaml")


def rds_successes(sample: EnvoySample) -> int:
    return sum(sample.stats.values())


def no_cluster(envoy: EnvoyProcess) -> int:
    return sum(v for k, v in envoy.stats().items() if k.endswith(".no_cluster"))


def parse_ts(ts: str) -> float:
    """The JsonFormatter's ``2026-01-01T12:00:00.123Z`` as epoch seconds."""
    whole, _, millis = ts.rstrip("Z").partition(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) - time.timezone + int(millis or 0) / 1000


def test_restart_longer_than_the_step_waits_for_envoy_before_promoting(
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
    timings: dict[str, Any] = {"downtime_target_s": DOWNTIME}
    sampler: EnvoySampler | None = None
    try:
        write_policy(policies, port, "v1", backends.address("v1"), None)
        plane.start()
        envoy = envoy_factory(plane.xds_port, node_id=NODE)
        envoy.wait_ready()
        envoy.wait_for_listener(port)

        def weights() -> dict[str, int]:
            return envoy.route_weights(route).get(NAME, {})

        wait_until(lambda: weights() == {OLD: 100}, 10, what="Envoy at 100 % v1")
        # Envoy's RDS counter for the route, read before the route in each sample.
        sampler = EnvoySampler(envoy, route, NAME, stats_filter=RDS_SUCCESS).start()
        lg = loadgen_factory(f"127.0.0.1:{port}", HOST, clients=CLIENTS)  # no rate cap
        lg.wait_for_requests(200)

        write_policy(policies, port, "v2", backends.address("v2"), {"steps": [50], "interval": "2s"})
        wait_until(lambda: weights() == {OLD: 50, CANARY: 50}, 15, interval=0.02, what="Envoy at 50 % v2")
        wait_until(
            lambda: (s := saved_rollout(plane.state, NAME)) is not None and s["weight"] == 50 and s["step_started_at"],
            10,
            interval=0.02,
            what="the 50 % step started in the state file",
        )
        step_started_at = saved_rollout(plane.state, NAME)["step_started_at"]  # type: ignore[index]
        seen_half = sampler.first_at
        wait_until(lambda: seen_half(CANARY, 50), 5, interval=0.01, what="a sample of Envoy at 50 % before the kill")

        killed_at = time.monotonic()
        killed_wall = time.time()
        plane.current.kill9()
        wait_until(
            lambda: envoy.stats().get("control_plane.connected_state") == 0, 10, interval=0.01,
            what="Envoy to notice the dead plane",
        )
        timings["envoy_noticed_disconnect_s"] = time.monotonic() - killed_at
        # Down for DOWNTIME s: the scenario, not a wait for something. Envoy keeps serving meanwhile.
        while time.monotonic() - killed_at < DOWNTIME:
            assert weights() == {OLD: 50, CANARY: 50}
            time.sleep(0.1)
        down_load = lg.snapshot()

        restarted_at = time.monotonic()
        restarted_wall = time.time()
        proc = plane.start("--reconnect-grace", "30")
        listening_at = time.monotonic()
        timings["plane_down_s"] = listening_at - killed_at
        timings["restart_to_listening_s"] = listening_at - restarted_at
        timings["step_remaining_at_kill_s"] = max(0.0, step_started_at + 2.0 - killed_wall)
        wait_until(lambda: plane.proxy_connected(NODE), 40, interval=0.02, what=f"{NODE} to reconnect")
        reconnected_at = time.monotonic()
        timings["listening_to_envoy_reconnected_s"] = reconnected_at - listening_at

        def completed() -> bool:
            return weights() == {CANARY: 100} and OLD not in envoy.cluster_names()

        wait_until(completed, 40, interval=0.05, what=f"100 % v2 and {OLD} gone from Envoy")
        timings["restart_to_completed_s"] = time.monotonic() - restarted_at
        lg.wait_for_requests(200)
        result = lg.stop()
        dropped = no_cluster(envoy)
        clusters = envoy.cluster_names()
        saved = saved_rollout(plane.state, NAME)
        entries = plane.log_entries(proc)
    finally:
        if sampler is not None:
            sampler.stop()
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {plane.describe()}")
        plane.stop()

    # The new process's log, in order: restored, waiting for envoy-1, envoy-1 connected, then promotion.
    messages = [str(e.get("message", "")) for e in entries]
    connected = next(i for i, m in enumerate(messages) if m.startswith(f"proxy connected: node={NODE} "))
    transitions = [(i, match.groups()) for i, m in enumerate(messages) if (match := TRANSITION.match(m))]
    promoting = [i for i, (_, to) in transitions if to in ("Promoting", "Stable")]
    waiting = [m for m in messages if m.startswith("waiting up to 30s for 1 proxies to reconnect")]
    evidence = "\n  ".join(f"{e.get('ts')} {e.get('logger')} {e.get('message')}" for e in entries[:60])
    first_promotion = entries[promoting[0]] if promoting else None
    if first_promotion is not None:
        promoted = parse_ts(first_promotion["ts"])
        timings["envoy_reconnected_to_promotion_s"] = promoted - parse_ts(entries[connected]["ts"])
        timings["restart_to_promotion_s"] = promoted - restarted_wall
    assert sampler is not None
    half = {OLD: 50, CANARY: 50}
    samples = list(sampler.samples)
    before_kill = [x for x in samples if x.at < killed_wall]
    after_restart = [x for x in samples if x.at >= restarted_wall]
    promoted_at = next((x.at for x in after_restart if x.weights.get(CANARY) == 100), None)
    assert before_kill and before_kill[-1].weights == half and promoted_at is not None, sampler.changes(CANARY)
    accepted_before_kill = rds_successes(before_kill[-1])
    # A sample reads the counter first and the route second: a higher count next to a 50/50 route
    # is an RDS update Envoy accepted from the new process while it still routed 50/50.
    reacked = [
        x for x in after_restart
        if x.at < promoted_at and x.weights == half and rds_successes(x) > accepted_before_kill
    ]  # fmt: skip
    timings["envoy_rds_accepted_before_kill"] = accepted_before_kill
    timings["envoy_reacked_to_promotion_route_s"] = promoted_at - reacked[0].at if reacked else None
    timings.update(
        requests=result.total,
        requests_while_down=down_load.total,
        failed=result.failed,
        by_status=result.by_status,
        by_version=result.by_version,
        no_cluster=dropped,
        transitions_after_restart=[t for _, t in transitions],
    )
    print("\n[restart-gap] " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in timings.items()))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")

    assert waiting, evidence
    assert promoting, evidence
    assert reacked, [(round(x.at - restarted_wall, 3), x.weights, x.stats) for x in after_restart[:80]]
    assert connected < promoting[0], f"promoted before {NODE} reconnected:\n  {evidence}"
    assert result.failed == 0, (result.failures, result.by_status, evidence)
    assert dropped == 0, evidence
    assert clusters == {CANARY}, clusters
    assert saved is not None and saved["phase"] == "Stable" and saved["stable"]["version"] == "v2", saved
    assert timings["plane_down_s"] >= DOWNTIME
    assert timings["listening_to_envoy_reconnected_s"] < 35 and timings["restart_to_completed_s"] < 40
