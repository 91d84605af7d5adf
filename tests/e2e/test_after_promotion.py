"""The guarded promotion (``strategy.afterPromotion``) through a real Envoy and a real Prometheus.

One Envoy, one Prometheus (scraping Envoy every second) and one in-process control plane serve the
module; each test has its own rollout name, listener and backends. A test serves v1 under steady
load, then writes v2 with one 50 % step, fast checks and an ``afterPromotion`` window:

- a window that catches a failure: while Guarding, Envoy holds both clusters and every request
  reaches v2; then v2 answers 500 and the checks revert it: Envoy's route sends everything back
  to v1 in one RDS update, and the events say why;
- a healthy window: once ``keep`` is over (and a round passed) v2 is Stable and v1's cluster
  leaves Envoy, with no failed request.
- a restart inside the window: ``aviary serve`` (with a state file) is killed with SIGKILL and
  started again; the window goes on from the saved status and ends by itself, with no failed
  request, and the CLI (``status``, ``status -o json``, ``watch -o json``) shows it throughout.

Figures (requests failed under load, the time from the first 5xx to the revert at Envoy) are
printed and written to ``tests/e2e/.results/after_promotion.json``; only generous hang bounds are
asserted on time.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from aviary.admin.convert import WallClock, rollout_message
from aviary.admin.render import as_json, rollout_line
from aviary.admin.v1 import admin_pb2 as pb
from aviary.discovery.resources import route_name
from aviary.policy.rollout_state import Phase, RolloutStatus
from aviary.policy.schema import ListenerSpec
from tests.conftest import EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import write_policy
from tests.rig.loadgen import LoadGenerator, LoadResult
from tests.rig.ports import free_port, port_open
from tests.rig.serve_process import AVIARY, AviaryServe, saved_rollout
from tests.rig.stage import HOST, Rig, RouteWatch, Stage, running_rig, write_results
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENTS = 4
RATE_PER_CLIENT = 40.0  # ~160 req/s: enough canary requests for the checks, little CPU on 2 cores
RESULTS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory.mktemp("after-promotion"), Rig) as rig:
        yield rig
        write_results("after_promotion", RESULTS)


@dataclass
class Guarded(Stage):
    """One rollout under test (``Stage``): v1 serving through Envoy under load, its route watched."""

    rig: Rig
    load: LoadGenerator
    watch: RouteWatch

    def message(self) -> pb.Rollout:
        """What `aviary status` gets from the admin API for this rollout, built by the same code."""

        def build(plane: Any) -> pb.Rollout:
            runner = plane.runner
            rollout = runner.rollout(self.name)
            return rollout_message(runner.status(self.name), rollout.spec if rollout else None,
                                   runner.history(self.name), WallClock.now(runner.now()))

        return self.rig.plane.call(build)

    def wait_for(self, phase: Phase, timeout: float) -> RolloutStatus:
        def there() -> RolloutStatus | None:
            status = self.status()
            return status if status.phase is phase else None

        try:
            status = wait_until(there, timeout, what=f"{self.name} to be {phase.value}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.story()}") from exc
        assert status is not None  # wait_until returns only a truthy value
        return status

    def next_requests(self, n: int = 100) -> dict[str, int]:
        """Counts of ``n`` requests by version (and failed), after the ones in flight are left behind."""
        before = self.load.wait_for_requests(40, timeout=20)
        after = self.load.wait_for_requests(n, timeout=20)
        return {k: v for k, v in after.minus(before).items() if v}


def write_guarded(rig: Rig, name: str, port: int, version: str, endpoint: str, keep: str | None = None) -> None:
    """v1 without strategy; with ``keep``: one 50 % step, fast checks on Prometheus, afterPromotion."""
    if keep is None:
        write_policy(rig.policies, name, port=port, version=version, endpoints=[endpoint])
        return
    strategy = {"steps": [50], "interval": "2s", "afterPromotion": {"keep": keep}}
    analysis = {"prometheus": rig.prometheus.url, "checkEvery": "1s", "window": "5s", "minRequests": 5,
                "failureLimit": 0, "inconclusiveLimit": 10,
                "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}]}
    write_policy(rig.policies, name, port=port, version=version, endpoints=[endpoint], strategy=strategy,
                 analysis=analysis)


@pytest.fixture
def guarded(rig: Rig, backends: Backends, loadgen_factory: LoadgenFactory) -> Iterator[Any]:
    """``guarded(name)``: v1 serving ``name`` through Envoy under load; removed at teardown."""
    made: list[Guarded] = []
    stack = contextlib.ExitStack()
    backends.start(["v1", "v2"])

    def make(name: str) -> Guarded:
        port = free_port()
        write_guarded(rig, name, port, "v1", backends.address("v1"))
        route = route_name(ListenerSpec(address="127.0.0.1", port=port))
        wait_until(lambda: rig.envoy.route_weights(route).get(name) == {f"{name}_v1": 100} and port_open(port),
                   15, what=f"Envoy to route {name} to v1")
        watch = stack.enter_context(RouteWatch(rig.envoy, route))
        load = loadgen_factory(f"127.0.0.1:{port}", HOST, CLIENTS, RATE_PER_CLIENT)
        first = load.wait_for_requests(40, timeout=15)
        assert first.failed == 0 and first.by_version == {"v1": first.total}, first
        guarded = Guarded(rig.plane, rig.envoy, backends, rig.policies, port, rig, load, watch, name=name)
        made.append(guarded)
        return guarded

    try:
        yield make
    finally:
        stack.close()
        for guarded in made:
            RESULTS[guarded.name] = guarded.figures
            with contextlib.suppress(Exception):
                guarded.load.stop()
            (rig.policies / f"{guarded.name}.yaml").unlink(missing_ok=True)


def enter_the_window(g: Guarded, keep: str) -> RolloutStatus:
    """v2 written with ``keep``; returns the status once Guarding, having checked Envoy meanwhile."""
    write_guarded(g.rig, g.name, g.port, "v2", g.backends.address("v2"), keep=keep)
    status = g.wait_for(Phase.GUARDING, 40)
    assert (status.stable.version, status.canary.version if status.canary else None, status.weight) == \
        ("v1", "v2", 100), g.story()
    # Both clusters in Envoy, the previous one warm at weight 0; everything reaches v2.
    wait_until(lambda: g.weights() == {g.cluster("v1"): 0, g.cluster("v2"): 100}, 10, what="route v2=100, v1=0")
    assert {g.cluster("v1"), g.cluster("v2")} <= g.rig.envoy.cluster_names()
    assert set(g.next_requests()) == {"v2"}
    return status


def test_a_failure_inside_the_window_reverts_to_the_previous_version_in_one_push(
        rig: Rig, guarded: Any) -> None:
    g: Guarded = guarded("guard-revert")
    enter_the_window(g, keep="60s")
    # What the operator sees meanwhile: the status line and the JSON of `aviary status`.
    message = g.message()
    assert "v2 promoted; v1 kept warm for " in rollout_line(message) and " more: " in rollout_line(message), \
        rollout_line(message)
    data = json.loads(as_json(message))
    assert (data["phase"], data["kept_version"], data["keep_seconds"]) == ("Guarding", "v1", 60.0)
    assert 0 < data["keep_seconds_left"] <= 60
    g.figures["status_line_in_window"] = rollout_line(message)

    updates_before = g.rds_updates()
    before = g.load.snapshot()
    g.backends.set_behaviour("v2", error_rate=1.0)
    status = g.wait_for(Phase.ROLLED_BACK, 40)
    assert (status.stable.version, status.failed_version) == ("v1", "v2"), g.story()
    [revert] = [e for e in g.history() if e.from_phase is Phase.GUARDING]
    assert revert.to_phase is Phase.ROLLED_BACK, g.story()
    assert revert.reason.startswith("reverted to v1 within afterPromotion: failed (1) > failureLimit (0)"), g.story()

    # Envoy: everything back on v1; then v2's cluster leaves (make-before-break).
    wait_until(lambda: g.weights() == {g.cluster("v1"): 100}, 10, what="route back to v1 only")
    wait_until(lambda: g.cluster("v2") not in rig.envoy.cluster_names(), 15, what="v2's cluster to leave Envoy")
    rds_pushes = g.rds_updates() - updates_before
    after = g.next_requests()
    assert after == {"v1": after.get("v1", 0)} and after["v1"] > 0, after
    first_5xx = g.load.snapshot().first_status_5xx_at
    assert first_5xx is not None
    reverted_at = g.watch.first_after(first_5xx, {g.cluster("v1"): 100})
    assert reverted_at is not None, g.watch.describe()
    result: LoadResult = g.load.stop()
    failed = result.failed - before.failed
    g.figures.update({
        "first_5xx_to_revert_at_envoy_s": round(reverted_at - first_5xx, 3),
        "requests_failed_before_the_revert": failed,
        "requests_total": result.total,
        "rds_pushes_for_the_revert": rds_pushes,
        "revert_reason": revert.reason,
    })
    print(f"[figures] revert within afterPromotion: {g.figures}")
    assert rds_pushes == 1, f"{g.figures}\n{g.watch.describe()}"
    assert reverted_at - first_5xx < 30, g.figures  # a hang bound, not a goal


def test_a_healthy_window_ends_with_the_previous_version_retired(rig: Rig, guarded: Any) -> None:
    g: Guarded = guarded("guard-ends")
    entered = enter_the_window(g, keep="3s")
    status = g.wait_for(Phase.STABLE, 40)
    assert (status.stable.version, status.canary) == ("v2", None), g.story()
    [ended] = [e for e in g.history() if e.from_phase is Phase.GUARDING]
    assert ended.reason == \
        "afterPromotion window (3s) over and the latest check round passed: v2 is stable, v1 retired", g.story()
    stable_at = time.time()
    wait_until(lambda: g.cluster("v1") not in rig.envoy.cluster_names(), 15, what="v1's cluster to leave Envoy")
    v1_left_s = time.time() - stable_at
    assert g.weights() == {g.cluster("v2"): 100}
    assert set(g.next_requests()) == {"v2"}
    result = g.load.stop()
    g.figures.update({
        "window_s": round(ended.at - (entered.step_started_at or ended.at), 3),
        "v1_cluster_gone_after_stable_s": round(v1_left_s, 3),
        "requests_total": result.total,
        "requests_failed": result.failed,
    })
    print(f"[figures] healthy afterPromotion window: {g.figures}")
    assert result.failed == 0, result.failures


# --------------------------------------------------------------------- a restart inside the window


def first_json_line(args: list[str], timeout: float) -> dict[str, Any]:
    """Start ``args`` (a command that streams JSON lines until stopped), return its first line, stop it."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"no output from {' '.join(args)} within {timeout}s"
        line: dict[str, Any] = json.loads(proc.stdout.readline())
        return line
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_restart_inside_the_window_resumes_it_from_the_saved_status(
        workdir: Path, backends: Backends, envoy_factory: EnvoyFactory, loadgen_factory: LoadgenFactory) -> None:
    """`aviary serve` (state file) is killed with SIGKILL in the window and started again: Envoy keeps
    both clusters meanwhile, the window goes on from the saved status (its clock waits for the ACK of
    100 %, then runs on), ends by itself and retires v1; the CLI shows the window throughout."""
    name, keep = "guard-restart", 15.0
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    plane = AviaryServe(workdir / "aviary", policies, workdir / "state" / "aviary.db")
    port = free_port()
    route = route_name(ListenerSpec(address="127.0.0.1", port=port))
    figures: dict[str, Any] = {}
    try:
        write_policy(policies, name, port=port, version="v1", endpoints=[backends.address("v1")])
        plane.start()
        envoy = envoy_factory(plane.xds_port, node_id="envoy-1")
        envoy.wait_ready()

        def weights() -> dict[str, int]:
            return envoy.route_weights(route).get(name, {})

        wait_until(lambda: weights() == {f"{name}_v1": 100} and port_open(port), 15, what="Envoy to route to v1")
        load = loadgen_factory(f"127.0.0.1:{port}", HOST, CLIENTS, 25.0)
        load.wait_for_requests(40, timeout=15)
        write_policy(policies, name, port=port, version="v2", endpoints=[backends.address("v2")],
                     strategy={"steps": [50], "interval": "1s", "afterPromotion": {"keep": f"{keep:g}s"}})

        def saved_phase() -> str | None:
            saved = saved_rollout(plane.state, name)
            return saved["phase"] if saved else None

        wait_until(lambda: saved_phase() == "Guarding", 30, what="the window in the state file")
        wait_until(lambda: weights() == {f"{name}_v1": 0, f"{name}_v2": 100}, 10, what="route v2=100, v1=0")
        assert {f"{name}_v1", f"{name}_v2"} <= envoy.cluster_names()

        # The CLI, as an operator runs it: status text, -o json, watch -o json.
        text = plane.cli("status", name).stdout
        assert "v1 (warm)" in text and "v2 promoted; v1 kept warm for " in text, text
        data = plane.cli_json("status", name)
        assert (data["phase"], data["kept_version"], data["keep_seconds"]) == ("Guarding", "v1", keep), data
        watched = first_json_line([str(AVIARY), "watch", name, "-o", "json", "--admin",
                                   f"127.0.0.1:{plane.admin_port}"], 20)
        assert (watched["phase"], watched["kept_version"]) == ("Guarding", "v1"), watched
        figures["status_before_kill"] = {k: data[k] for k in ("phase", "kept_version", "keep_seconds_left")}

        killed_at = time.time()
        plane.current.kill9()
        wait_until(lambda: envoy.stats().get("control_plane.connected_state") == 0, 10, what="Envoy to notice")
        plane.start(timeout=20)
        wait_until(lambda: envoy.stats().get("control_plane.connected_state") == 1, 30, what="Envoy to reconnect")
        figures["plane_down_s"] = round(time.time() - killed_at, 3)
        # Still the window: v1 warm in Envoy, the status says so.
        after = plane.cli_json("status", name)
        assert (after["phase"], after["kept_version"]) == ("Guarding", "v1"), after
        assert {f"{name}_v1", f"{name}_v2"} <= envoy.cluster_names()
        figures["status_after_restart"] = {k: after.get(k) for k in ("phase", "kept_version", "keep_seconds_left")}

        wait_until(lambda: saved_phase() == "Stable", 40, what="the window to end")
        wait_until(lambda: f"{name}_v1" not in envoy.cluster_names(), 15, what="v1's cluster to leave Envoy")
        assert weights() == {f"{name}_v2": 100}
        events = plane.cli_json("status", name)["events"]
        reasons = [e["reason"] for e in events]
        assert any("afterPromotion window goes on, v1 kept warm" in r for r in reasons), reasons
        assert any(r.startswith("afterPromotion window (15s) over: v2 is stable, v1 retired") for r in reasons), \
            reasons
        entered = next(e for e in events if e["to_phase"] == "Guarding")
        ended = next(e for e in events if e["from_phase"] == "Guarding" and e["to_phase"] == "Stable")
        figures["window_wall_s"] = round(_seconds(ended["time"]) - _seconds(entered["time"]), 3)
        result = load.stop()
        figures.update(requests_total=result.total, requests_failed=result.failed)
        print(f"[figures] restart inside the afterPromotion window: {figures}")
        assert result.failed == 0, result.failures
    finally:
        RESULTS[name] = figures
        write_results("after_promotion", RESULTS)
        plane.stop()


def _seconds(stamp: str) -> float:
    """An RFC 3339 timestamp of the admin API's JSON, as epoch seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
