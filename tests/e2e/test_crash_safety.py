"""Crash safety: `kill -9` of a real `aviary serve` process while a real Envoy serves load.

Each test runs `aviary serve` as a subprocess with ``--state FILE`` in tmp and fixed free ports for
xDS, admin and metrics (so the restarted process binds the same xDS port Envoy keeps dialling),
HTTP backends for v1 and v2, one Envoy, and the rig's load generator at a modest rate. A thread
samples Envoy's canary weight (tests/rig/envoy_sampler.py, from /config_dump) every ~50 ms for the whole
test. The plane is killed with SIGKILL at a chosen moment of a canary and started again with the
same arguments; Envoy keeps serving its last config meanwhile and reconnects by itself.

What must hold: no failed request, the canary weight Envoy has never goes down, and the rollout
completes (100 % v2 and the old version's cluster gone from Envoy). A step interrupted by the kill
keeps the time it had run: from Envoy's samples, its time at the step's weight while a plane was
alive is one interval (see ``test_kill_during_canary_step``). Timings (plane down, restart to Envoy
reconnected, time to completion) are printed and written to
``tests/e2e/.results/crash_safety.json``; only generous bounds are asserted.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.discovery.resources import cluster_name
from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.envoy import EnvoyProcess
from tests.rig.envoy_sampler import EnvoySampler
from tests.rig.holding_proxy import HoldingProxy
from tests.rig.loadgen import LoadGenerator, LoadResult
from tests.rig.ports import free_ports, port_open
from tests.rig.serve_process import AviaryServe, saved_rollout
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"
CANARY = cluster_name(NAME, "v2")
OLD = cluster_name(NAME, "v1")
CLIENTS = 4
RATE_PER_CLIENT = 25.0  # ~100 req/s in all: modest, leaves CPU for the plane on 2 cores
RESULTS_FILE = Path(__file__).resolve().parent / ".results" / "crash_safety.json"
STEP_INTERVAL = 8.0  # seconds per step in the kill-during-a-step test
KILL_INTO_STEP = 4.0  # the kill comes this long after the step started: half of it
DOWN_FOR = 3.0  # seconds the killed plane stays down (the scenario)
HEARTBEAT = 1.0  # `aviary serve` records that it is alive once a second (app.py _keep_alive)
LIVE_SLACK = 1.0  # Envoy sampling (50 ms), the reconnect-to-ACK gap, timers on a loaded 2-core machine


# ------------------------------------------------------------------------------ state file


def saved_phase(state: Path) -> tuple[str, str, str | None, int] | None:
    """(phase, stable version, canary version, weight) from the state file."""
    status = saved_rollout(state, NAME)
    if status is None:
        return None
    canary = status.get("canary")
    return status["phase"], status["stable"]["version"], canary["version"] if canary else None, status["weight"]


# ------------------------------------------------------------------------------ the stage


@dataclass
class Stage:
    workdir: Path
    backends: Backends
    policies: Path
    state: Path
    plane: AviaryServe
    envoy: EnvoyProcess
    port: int
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def route(self) -> str:
        return f"route-127.0.0.1-{self.port}"

    def write_policy(self, version: str, strategy: dict[str, Any] | None = None) -> None:
        write_policy(self.policies, self.port, version, self.backends.address(version), strategy)

    def weights(self) -> dict[str, int]:
        return self.envoy.route_weights(self.route).get(NAME, {})

    def envoy_connected(self) -> bool:
        return self.envoy.stats().get("control_plane.connected_state") == 1

    def evidence(self) -> str:
        """Envoy's error counters, its route and clusters, and the plane's warnings, for messages."""
        keys = (
            "no_cluster",
            "no_route",
            "upstream_rq_5xx",
            "upstream_cx_connect_fail",
            "downstream_rq_5xx",
            "rq_timeout",
            "update_rejected",
        )
        stats: dict[str, Any]
        try:
            stats = {k: v for k, v in self.envoy.stats().items() if v and any(key in k for key in keys)}
            clusters = sorted(self.envoy.cluster_names())
            weights = self.weights()
        except Exception as exc:  # Envoy itself gone: say so
            stats, clusters, weights = {"envoy admin error": repr(exc)}, [], {}
        warnings = [
            f"{p.name}: {e.get('ts')} {e.get('logger')} {e.get('message')}"
            for p in self.plane.processes
            for e in self.plane.log_entries(p)
            if e.get("level") in ("warning", "error", "critical") or "rollout" in str(e.get("message", ""))
        ]
        state = None
        with contextlib.suppress(Exception):
            state = saved_phase(self.state)
        return (
            f"\nEnvoy stats {stats}\nEnvoy route {weights}, clusters {clusters}\nsaved state {state}"
            "\nplane log (rollout lines and warnings):\n  " + "\n  ".join(warnings[-40:])
        )

    def record(self, test: str, **values: Any) -> None:
        self.timings.update(values)
        print(f"[crash-safety] {test}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))


def write_policy(
    policies: Path, port: int, version: str, endpoint: str, strategy: dict[str, Any] | None = None
) -> None:
    spec: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": port},
        "hosts": [HOST],
        "version": version,
        "endpoints": [endpoint],
    }
    if strategy is not None:
        spec["strategy"] = strategy
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME}, "spec": spec}
    tmp = policies / f".{NAME}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(policies / f"{NAME}.yaml")  # the watcher never reads half a file


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_results(test: str, values: dict[str, Any]) -> None:
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        results = json.loads(RESULTS_FILE.read_text())
    results[test] = values
    RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def stage(
    workdir: Path, backends: Backends, envoy_factory: EnvoyFactory, request: pytest.FixtureRequest
) -> Iterator[Stage]:
    """Stable v1 served by `aviary serve` (state file in tmp) to one Envoy, which is LIVE."""
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    plane = AviaryServe(workdir / "aviary", policies, workdir / "state" / "aviary.db")
    (port,) = free_ports(1)
    try:
        write_policy(policies, port, "v1", backends.address("v1"))
        plane.start()
        envoy = envoy_factory(plane.xds_port, node_id=NODE)
        stage = Stage(workdir, backends, policies, plane.state, plane, envoy, port)
        envoy.wait_ready()
        envoy.wait_for_listener(port)
        wait_until(lambda: stage.weights() == {OLD: 100}, 10, what=f"Envoy route {{{OLD}: 100}}")
        yield stage
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {plane.describe()}")
        plane.stop()


def kill_and_restart(stage: Stage, test: str, down_for: float = 0.0) -> dict[str, float]:
    """SIGKILL the plane, keep it down ``down_for`` s at least, start it again with the same args,
    wait for Envoy to reconnect. ``killed_wall`` and ``envoy_reconnected_wall`` are time.time()."""
    plane = stage.plane
    killed_wall = time.time()
    killed_at = time.monotonic()
    plane.current.kill9()
    # Envoy notices the dead stream (TCP reset) and keeps serving its config meanwhile.
    wait_until(lambda: not stage.envoy_connected(), 10, interval=0.01, what="Envoy to notice the dead plane")
    noticed = time.monotonic() - killed_at
    while time.monotonic() - killed_at < down_for:  # the scenario: the plane stays dead this long
        time.sleep(0.05)
    spawned_at = time.monotonic()
    plane.start(timeout=20)
    listening_at = time.monotonic()
    wait_until(lambda: plane.proxy_connected(NODE), 30, interval=0.02, what=f"{NODE} to reconnect to the new plane")
    plane_saw_envoy = time.monotonic()
    wait_until(stage.envoy_connected, 10, interval=0.02, what="Envoy control_plane.connected_state == 1")
    envoy_reconnected_wall = time.time()
    timing = {
        "killed_wall": killed_wall,
        "envoy_reconnected_wall": envoy_reconnected_wall,
        "envoy_noticed_disconnect_s": noticed,
        "plane_down_s": listening_at - killed_at,  # kill -> new process listening on the xDS port
        "restart_to_listening_s": listening_at - spawned_at,
        "restart_to_envoy_reconnected_s": plane_saw_envoy - spawned_at,
        "listening_to_envoy_reconnected_s": plane_saw_envoy - listening_at,
    }
    stage.record(test, **timing)
    return timing


def finish_load(lg: LoadGenerator, requests: int = 100) -> LoadResult:
    lg.wait_for_requests(requests, timeout=30)
    return lg.stop()


# ------------------------------------------------------------------------------ 1. kill at 30 %


def test_kill_during_canary_step(stage: Stage, loadgen_factory: LoadgenFactory) -> None:
    """Killed halfway through an 8 s step at 30 % and kept down 3 s: the restored step keeps the
    time it had run and its clock stays stopped until Envoy is back, so Envoy serves 30 % for one
    interval of live plane time (time at 30 % minus the outage from the kill to Envoy's reconnect).

    A clock that ran on through the outage gives about 4 s of live time; a step restarted from zero
    about 12 s. A restored step may lose up to one heartbeat (1 s) of credit: it is never shorter.
    """
    test = "kill_during_canary_step"
    sampler = EnvoySampler(stage.envoy, stage.route, NAME).start()
    t0 = time.time()
    try:
        lg = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=CLIENTS, rate_per_client=RATE_PER_CLIENT)
        lg.wait_for_requests(100)
        stage.write_policy("v2", {"steps": [30, 60], "interval": f"{STEP_INTERVAL:g}s"})
        started = time.monotonic()
        wait_until(lambda: stage.weights() == {OLD: 70, CANARY: 30}, 15, what="Envoy at 30 % v2")
        at_30 = time.monotonic() - started
        # Kill inside the step, once the step's start (every proxy ACKed 30 %) is persisted.
        step_started_at = wait_until(
            lambda: (s := saved_rollout(stage.state, NAME)) is not None and s["weight"] == 30 and s["step_started_at"],
            10,
            what="step 1 (30 %) started in the state file",
        )
        # The scenario: load at 30 % until the step is half done (then the kill).
        wait_until(lambda: time.time() >= step_started_at + KILL_INTO_STEP, STEP_INTERVAL, what="the step half done")
        assert stage.weights() == {OLD: 70, CANARY: 30}, stage.evidence()
        before_kill = saved_phase(stage.state)
        killed_at = time.time()
        timing = kill_and_restart(stage, test, down_for=DOWN_FOR)

        def completed() -> bool:
            return stage.weights() == {CANARY: 100} and OLD not in stage.envoy.cluster_names()

        wait_until(completed, 40, interval=0.1, what=f"100 % v2 and {OLD} gone from Envoy")
        completed_after_restart = time.time() - killed_at - timing["plane_down_s"]
        result = finish_load(lg)
    finally:
        sampler.stop()

    saved = saved_phase(stage.state)
    changes = sampler.changes(CANARY, since=t0)
    span_30 = sampler.span_at(CANARY, 30)
    assert span_30 is not None, (changes, stage.evidence())
    # Envoy's time at 30 % while a plane was alive: before the kill, and after Envoy reconnected.
    live_at_30 = (timing["killed_wall"] - span_30[0]) + (span_30[1] - timing["envoy_reconnected_wall"])
    values = {
        **timing,
        "interval_s": STEP_INTERVAL,
        "policy_to_envoy_30_s": at_30,
        "restart_to_completed_s": completed_after_restart,
        "envoy_seconds_at_30": sampler.time_at(CANARY, 30),
        "envoy_live_seconds_at_30": live_at_30,
        "envoy_seconds_at_30_before_kill": timing["killed_wall"] - span_30[0],
        "envoy_seconds_at_60": sampler.time_at(CANARY, 60),
        "canary_weight_changes": changes,
        "samples": len(sampler.samples),
        "sample_errors": sampler.errors,
        "saved_before_kill": before_kill,
        "saved_after": saved,
        "requests": result.total,
        "failed": result.failed,
        "by_version": result.by_version,
    }
    stage.record(test, **{k: v for k, v in values.items() if k not in timing})
    write_results(test, values)

    assert result.failed == 0, (result.failures, result.by_status, stage.evidence())
    assert sampler.decreases(CANARY) == [], (sampler.decreases(CANARY), changes, stage.evidence())
    seen = [w for _, w in changes]
    assert seen == [0, 30, 60, 100], (changes, stage.evidence())
    assert saved == ("Stable", "v2", None, 0), stage.evidence()
    assert stage.envoy.cluster_names() == {CANARY}
    assert timing["plane_down_s"] < 15 and timing["restart_to_envoy_reconnected_s"] < 30
    # The restored step kept its time: one interval of live time at 30 %, not less, not restarted.
    assert STEP_INTERVAL - 0.3 <= live_at_30 <= STEP_INTERVAL + HEARTBEAT + LIVE_SLACK, (live_at_30, values)
    # ...and its clock was stopped while the plane was down: Envoy stayed at 30 % through the outage.
    assert span_30[1] > timing["envoy_reconnected_wall"], (changes, values)


# ------------------------------------------------------------------------------ 2. kill between promotion and removal


def test_kill_between_promotion_and_old_cluster_removal(stage: Stage, loadgen_factory: LoadgenFactory) -> None:
    test = "kill_between_promotion_and_old_cluster_removal"
    sampler = EnvoySampler(stage.envoy, stage.route, NAME).start()
    fake = HoldingProxy(stage.plane.xds_port, hold_until_route_drops=OLD, route=stage.route, node_id="fake-proxy")
    t0 = time.time()
    try:
        fake.start()
        # The fake proxy serves the rollout (same node cluster as Envoy) and has ACKed v1's route.
        wait_until(
            lambda: fake.stats().last_route_clusters == {OLD} and fake.stats().acks.get("RDS"),
            10,
            what="the fake proxy to ACK the route to v1",
        )
        assert stage.plane.proxy_connected("fake-proxy")
        lg = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=CLIENTS, rate_per_client=RATE_PER_CLIENT)
        lg.wait_for_requests(100)
        stage.write_policy("v2", {"steps": [50], "interval": "2s"})
        started = time.monotonic()

        def window() -> bool:
            """v2 is stable (persisted), Envoy routes 100 % to it, v1's cluster waits for the fake proxy."""
            return (
                fake.holding()
                and saved_phase(stage.state) == ("Stable", "v2", None, 0)
                and stage.weights() == {CANARY: 100}
                and OLD in stage.envoy.cluster_names()
            )

        wait_until(window, 30, interval=0.05, what=f"Stable(v2) persisted, Envoy 100 % v2, {OLD} kept")
        to_window = time.monotonic() - started
        held = fake.stats()
        lg.wait_for_requests(50)  # the window is stable: the fake proxy never ACKs
        assert window(), stage.evidence()
        killed_at = time.time()
        timing = kill_and_restart(stage, test)

        def completed() -> bool:
            return stage.weights() == {CANARY: 100} and OLD not in stage.envoy.cluster_names()

        # The fake proxy still routes to v1 (it never ACKed a route without it): the restarted plane
        # remembers the retiring cluster (saved with what it published) and keeps it for that proxy.
        wait_until(lambda: fake.stats().sessions >= 2, 15, what="the fake proxy to reconnect")
        wait_until(lambda: stage.plane.proxy_connected(NODE), 15, what="Envoy to reconnect")
        assert OLD in stage.envoy.cluster_names() and stage.weights() == {CANARY: 100}, stage.evidence()
        fake.stop()  # it lets go: now v1 may go
        wait_until(completed, 30, interval=0.05, what=f"{OLD} gone from Envoy")
        completed_after_restart = time.time() - killed_at - timing["plane_down_s"]
        result = finish_load(lg)
    finally:
        sampler.stop()
        fake.stop()

    saved = saved_phase(stage.state)
    changes = sampler.changes(CANARY, since=t0)
    values = {
        **timing,
        "policy_to_window_s": to_window,
        "restart_to_old_cluster_gone_s": completed_after_restart,
        "canary_weight_changes": changes,
        "samples": len(sampler.samples),
        "sample_errors": sampler.errors,
        "fake_proxy_before_kill": {"acks": held.acks, "held_routes": held.held_routes},
        "fake_proxy_after": {"sessions": fake.stats().sessions, "held_routes": fake.stats().held_routes},
        "saved_after": saved,
        "requests": result.total,
        "failed": result.failed,
        "by_version": result.by_version,
    }
    stage.record(test, **{k: v for k, v in values.items() if k not in timing})
    write_results(test, values)

    assert result.failed == 0, (result.failures, result.by_status, stage.evidence())
    assert sampler.decreases(CANARY) == [], (sampler.decreases(CANARY), changes, stage.evidence())
    assert [w for _, w in changes] == [0, 50, 100], (changes, stage.evidence())
    assert saved == ("Stable", "v2", None, 0), stage.evidence()
    assert stage.envoy.cluster_names() == {CANARY}
    assert timing["plane_down_s"] < 15 and timing["restart_to_envoy_reconnected_s"] < 30


# ------------------------------------------------------------------------------ 3. corrupt state file


def test_corrupt_state_file_is_refused_until_reset(workdir: Path, request: pytest.FixtureRequest) -> None:
    test = "corrupt_state_file"
    policies = workdir / "policies"
    policies.mkdir()
    state = workdir / "state" / "aviary.db"
    state.parent.mkdir()
    state.write_bytes(b"this is not an SQLite database\n" * 200)
    plane = AviaryServe(workdir / "aviary", policies, state)
    try:
        started = time.monotonic()
        refused = plane.spawn()
        code = refused.wait(20)
        refused_after = time.monotonic() - started
        output = refused.log_text()
        assert code != 0, output
        assert str(state) in output and "--reset-state" in output, output
        assert not port_open(plane.xds_port)
        assert state.read_bytes().startswith(b"this is not an SQLite database"), "the refused file was changed"

        started = time.monotonic()
        fresh = plane.start("--reset-state", timeout=20)
        reset_to_listening = time.monotonic() - started
        fresh.ensure_alive()
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
        assert {"rollouts", "events"} <= tables, tables
        stopped = fresh.stop(timeout=10)
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {plane.describe()}")
        plane.stop()
    message = next(line for line in output.splitlines() if "--reset-state" in line)
    values = {
        "exit_code": code,
        "refused_after_s": refused_after,
        "reset_to_listening_s": reset_to_listening,
        "exit_code_after_sigterm": stopped,
        "message": message,
    }
    print(f"[crash-safety] {test}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    write_results(test, values)
    assert stopped == 0, plane.describe()
