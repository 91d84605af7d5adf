"""A full or read-only state disk: rollbacks still reach Envoy, steps wait, nothing dies silently.

Each test runs `aviary serve` as a subprocess with its state file on a small file system mounted
for the test: a tmpfs of ``DISK_SIZE`` (filled with a file until ENOSPC, freed by deleting it), or,
for the read-only case, an ext4 image on a loop device mounted ``errors=remount-ro`` whose kernel
error trigger turns it read-only under the running process, as a disk error would. Mounting needs
root; without it (or without tmpfs / loop devices) the tests are skipped with the reason. Every
mount is unmounted at teardown, after the plane that uses it has stopped.

One real Envoy serves the rollout under steady load; the failing-canary cases are judged by a real
Prometheus scraping Envoy. A thread samples Envoy's route (its admin ``/config_dump``) every 50 ms.
What must hold:

(a) a canary failing half its requests is rolled back to 0 % at Envoy while the disk is full;
    status says the state cannot be written and health is NOT_SERVING; once space is freed the
    rollback is saved, health is SERVING again, and a restart keeps the canary at 0 %;
(b) a healthy canary does not step up while the disk is full (Envoy stays at the first step's
    weight), and continues once space is freed;
(c) a version change written while the disk is full is applied once space returns;
(d) on a file system that turns read-only under the plane, the rollback still reaches Envoy and
    status shows the error.

Figures (failed requests, first 5xx to 0 % at Envoy, what status said versus Envoy's weight) are
printed and written to ``tests/e2e/.results/state_faults.json``; only generous bounds are asserted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aviary.admin.v1 import admin_pb2 as pb
from aviary.admin.v1 import admin_pb2_grpc
from aviary.discovery.resources import cluster_name, route_name
from aviary.policy.schema import ListenerSpec
from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory, PrometheusFactory
from tests.rig.backends import Backends
from tests.rig.envoy import EnvoyProcess
from tests.rig.loadgen import LoadGenerator
from tests.rig.ports import free_ports
from tests.rig.serve_process import AviaryServe, saved_rollout
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"
CANARY = cluster_name(NAME, "v2")
OLD = cluster_name(NAME, "v1")
DISK_SIZE = "4m"
CLIENTS = 4
RATE_PER_CLIENT = 25.0  # ~100 req/s in all
RESULTS_FILE = Path(__file__).resolve().parent / ".results" / "state_faults.json"
FULL = "database or disk is full"


# ------------------------------------------------------------------------------ small disks


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=False)


class SmallDisk:
    """A file system mounted on ``path`` for one test: ``fill()`` it to ENOSPC, ``free()`` it again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        self.image: Path | None = None

    def _require_root(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system for the state file needs root")

    def mount_tmpfs(self, size: str = DISK_SIZE) -> SmallDisk:
        self._require_root()
        self.path.mkdir(parents=True, exist_ok=True)
        done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.path))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs on {self.path}: {done.stderr.strip()}")
        self.mounted = True
        return self

    def mount_ext4(self, image: Path, size_mb: int = 16) -> SmallDisk:
        """An ext4 image on a loop device, mounted errors=remount-ro (see ``turn_read_only``)."""
        self._require_root()
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        self.path.mkdir(parents=True, exist_ok=True)
        with image.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        made = _run("mkfs.ext4", "-q", "-F", str(image))
        if made.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
        done = _run("mount", "-o", "loop,errors=remount-ro", str(image), str(self.path))
        if done.returncode != 0:
            pytest.skip(f"cannot mount an ext4 image on a loop device: {done.stderr.strip()}")
        self.mounted = True
        self.image = image
        return self

    def turn_read_only(self) -> None:
        """Make the kernel report an ext4 error: with errors=remount-ro the file system turns
        read-only at once under the processes using it (``mount -o remount,ro`` cannot: it
        refuses with EBUSY while a file is open for writing)."""
        device = _run("findmnt", "-n", "-o", "SOURCE", str(self.path)).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"{trigger} does not exist: cannot make ext4 read-only under a running process")
        trigger.write_text("aviary test: state disk turns read-only\n")

    def fill(self) -> int:
        """Write a file until ENOSPC; returns the bytes written."""
        written = 0
        with (self.path / "fill").open("wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        f.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
                    written += chunk
        return written

    def free(self) -> None:
        (self.path / "fill").unlink()

    def unmount(self) -> None:
        if not self.mounted:
            return
        done = _run("umount", str(self.path))
        if done.returncode != 0:  # still busy (a process that would not stop): detach it anyway
            _run("umount", "-l", str(self.path))
        self.mounted = False


# ------------------------------------------------------------------------------ Envoy's route


class RouteSampler:
    """Reads Envoy's canary weight every 50 ms in a thread; keeps (epoch seconds, weight)."""

    def __init__(self, envoy: EnvoyProcess, route: str) -> None:
        self.envoy = envoy
        self.route = route
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="route-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # admin busy: the next sample will do
                weights: dict[str, int] = {}
                for by_cluster in self.envoy.route_weights(self.route).values():
                    weights.update(by_cluster)
                if weights:
                    self.samples.append((time.time(), weights.get(CANARY, 0)))
            self._stop.wait(0.05)  # pacing of the poll, not synchronisation

    def start(self) -> RouteSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def weight(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def max_since(self, since: float) -> int:
        return max((w for at, w in list(self.samples) if at >= since), default=0)

    def first_at(self, predicate: Callable[[int], bool], since: float) -> float | None:
        return next((at for at, w in list(self.samples) if at >= since and predicate(w)), None)

    def changes(self, since: float) -> list[tuple[float, int]]:
        """(seconds since ``since``, canary weight) at each change from ``since`` on."""
        out: list[tuple[float, int]] = []
        for at, weight in list(self.samples):
            if at >= since and (not out or out[-1][1] != weight):
                out.append((round(at - since, 3), weight))
        return out


# ------------------------------------------------------------------------------ the stage


@dataclass
class Stage:
    disk: SmallDisk
    backends: Backends
    policies: Path
    plane: AviaryServe
    envoy: EnvoyProcess
    port: int
    sampler: RouteSampler
    prometheus_url: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def write_policy(self, version: str, strategy: dict[str, Any] | None = None, analysis: bool = False) -> None:
        spec: dict[str, Any] = {
            "listener": {"address": "127.0.0.1", "port": self.port},
            "hosts": [HOST],
            "version": version,
            "endpoints": [self.backends.address(version)],
        }
        if strategy is not None:
            spec["strategy"] = strategy
        if analysis:
            assert self.prometheus_url is not None
            spec["analysis"] = {
                "prometheus": self.prometheus_url,
                "checkEvery": "1s",
                "window": "5s",
                "minRequests": 5,
                "failureLimit": 0,
                "inconclusiveLimit": 30,
                "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}],
            }
        doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME}, "spec": spec}
        tmp = self.policies / f".{NAME}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.policies / f"{NAME}.yaml")

    @property
    def route(self) -> str:
        return route_name(ListenerSpec(address="127.0.0.1", port=self.port))

    def weights(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for by_cluster in self.envoy.route_weights(self.route).values():
            out.update(by_cluster)
        return out

    def held_rollout(self, interval: float) -> pb.Rollout | None:
        """The rollout once its step has run past twice ``interval`` with its step up not saved."""
        rollout = self.rollout()
        return rollout if rollout.state_error and rollout.seconds_in_step > 2 * interval else None

    def policy_waiting(self) -> pb.ListRolloutsResponse | None:
        """The overview once it shows a policy change that could not be applied yet."""
        overview = self.overview()
        return overview if any("policy change not applied" in p for p in overview.health.problems) else None

    def overview(self) -> pb.ListRolloutsResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.plane.admin_port}") as channel:
            stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
            response: pb.ListRolloutsResponse = stub.ListRollouts(pb.ListRolloutsRequest(), timeout=5)
            return response

    def rollout(self) -> pb.Rollout:
        return next(r for r in self.overview().rollouts if r.name == NAME)

    def serving(self) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{self.plane.admin_port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def saved(self) -> tuple[str, int] | None:
        status = saved_rollout(self.plane.state, NAME)
        return (status["phase"], status["weight"]) if status else None

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of the plane's /metrics (None: not exported)."""
        url = f"http://127.0.0.1:{self.plane.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(f"{name} "):
                    return float(line.split()[1])
        return None

    def status_text(self) -> str:
        return self.plane.cli("status").stdout

    def engine_errors(self) -> list[str]:
        return [
            str(e.get("message"))
            for p in self.plane.processes
            for e in self.plane.log_entries(p)
            if e.get("level") in ("error", "critical") and "engine error" in str(e.get("message"))
        ]

    def evidence(self) -> str:
        lines = [
            f"{p.name}: {e.get('ts')} {e.get('level')} {e.get('message')}"
            for p in self.plane.processes
            for e in self.plane.log_entries(p)
            if e.get("level") in ("warning", "error", "critical") or "rollout" in str(e.get("message", ""))
        ]
        try:
            weights: Any = self.weights()
        except Exception as exc:
            weights = repr(exc)
        return f"\nEnvoy route {weights}\nplane log:\n  " + "\n  ".join(lines[-40:])

    def record(self, test: str, **values: Any) -> None:
        self.values.update(values)
        print(f"[state-faults] {test}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def write_results(self, test: str) -> None:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            results = json.loads(RESULTS_FILE.read_text())
        results[test] = self.values
        RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


StageFactory = Callable[..., Stage]


@pytest.fixture
def stage_factory(
    workdir: Path,
    backends: Backends,
    envoy_factory: EnvoyFactory,
    prometheus_factory: PrometheusFactory,
    request: pytest.FixtureRequest,
) -> Iterator[StageFactory]:
    """``stage_factory(disk="tmpfs"|"ext4", prometheus=False)``: stable v1 served by `aviary serve`
    (state file on the small disk) to one live Envoy; the plane stops before the disk unmounts."""
    mount_dir = Path(tempfile.mkdtemp(prefix="aviary-state-disk-"))
    disk = SmallDisk(mount_dir)
    planes: list[AviaryServe] = []
    samplers: list[RouteSampler] = []

    def make(kind: str = "tmpfs", prometheus: bool = False) -> Stage:
        if kind == "tmpfs":
            disk.mount_tmpfs()
        else:
            disk.mount_ext4(workdir / "state-disk.img")
        backends.start(["v1", "v2"])
        policies = workdir / "policies"
        policies.mkdir()
        plane = AviaryServe(workdir / "aviary", policies, disk.path / "state" / "aviary.db")
        planes.append(plane)
        (port,) = free_ports(1)
        stage = Stage(disk, backends, policies, plane, None, port, None)  # type: ignore[arg-type]
        stage.write_policy("v1")
        plane.start()
        stage.envoy = envoy_factory(plane.xds_port, node_id=NODE)
        stage.envoy.wait_ready()
        stage.envoy.wait_for_listener(port)
        wait_until(lambda: stage.weights() == {OLD: 100}, 15, what=f"Envoy route {{{OLD}: 100}}")
        stage.sampler = RouteSampler(stage.envoy, route_name(ListenerSpec(address="127.0.0.1", port=port))).start()
        samplers.append(stage.sampler)
        if prometheus:
            prom = prometheus_factory([f"127.0.0.1:{stage.envoy.admin_port}"], "1s")
            prom.wait_for_target_up(timeout=30)
            stage.prometheus_url = prom.url
        return stage

    try:
        yield make
    finally:
        for sampler in samplers:
            sampler.stop()
        for plane in planes:
            if request.node.stash.get(_FAILED, False):
                print(f"\n===== {plane.describe()}")
            plane.stop()
        disk.unmount()
        with contextlib.suppress(OSError):
            mount_dir.rmdir()


def start_load(stage: Stage, loadgen_factory: LoadgenFactory) -> LoadGenerator:
    load = loadgen_factory(f"127.0.0.1:{stage.port}", HOST, clients=CLIENTS, rate_per_client=RATE_PER_CLIENT)
    before = load.wait_for_requests(100, timeout=20)
    assert before.failed == 0, before.failures
    return load


def next_requests(load: LoadGenerator, n: int = 100) -> dict[str, int]:
    """Counts of the next ``n`` requests (per version and failed), after letting those in flight
    finish: the worker's progress file is refreshed every 0.1 s, so skipping 40 requests (~0.4 s)
    leaves the route change just waited for behind."""
    before = load.wait_for_requests(40, timeout=20)
    after = load.wait_for_requests(n, timeout=20)
    return {k: v for k, v in after.minus(before).items() if v}


def fill_and_wait_for_not_serving(stage: Stage) -> dict[str, Any]:
    """Fill the disk; wait until the plane says so (the heartbeat fails within a second)."""
    filled_at = time.monotonic()
    written = stage.disk.fill()
    wait_until(lambda: not stage.serving(), 10, interval=0.05, what="health NOT_SERVING with the disk full")
    overview = stage.overview()
    assert FULL in overview.health.state_error and str(stage.plane.state) in overview.health.state_error, (
        overview.health, stage.evidence())
    assert stage.metric("aviary_state_writable") == 0.0
    errors = stage.metric("aviary_state_write_errors_total")
    assert errors is not None and errors > 0
    return {"fill_bytes": written, "full_to_not_serving_s": time.monotonic() - filled_at,
            "health_state_error": overview.health.state_error, "state_write_errors_total": errors}


def free_and_wait_for_serving(stage: Stage) -> float:
    freed_at = time.monotonic()
    stage.disk.free()
    wait_until(stage.serving, 15, interval=0.05, what="health SERVING once space is freed")
    wait_until(lambda: stage.overview().health.state_error == "", 10, what="state_error cleared")
    assert stage.metric("aviary_state_writable") == 1.0
    return time.monotonic() - freed_at


# ------------------------------------------------------------------------------ (a) a failing canary


def test_failing_canary_is_rolled_back_at_envoy_while_the_disk_is_full(
    stage_factory: StageFactory, loadgen_factory: LoadgenFactory
) -> None:
    test = "failing_canary_rolled_back_with_disk_full"
    stage = stage_factory("tmpfs", prometheus=True)
    load = start_load(stage, loadgen_factory)
    stage.write_policy("v2", {"steps": [20, 50], "interval": "120s"}, analysis=True)
    wait_until(lambda: stage.weights() == {OLD: 80, CANARY: 20}, 20, what="Envoy at 20 % v2")
    wait_until(lambda: (s := saved_rollout(stage.plane.state, NAME)) is not None and s["step_started_at"],
               10, what="step 1 started in the state file")
    full = fill_and_wait_for_not_serving(stage)
    status_lines = stage.status_text().splitlines()
    assert status_lines[0].startswith("STATE NOT SAVED: state file "), status_lines
    assert FULL in status_lines[0], status_lines

    before = load.snapshot()
    stage.backends.set_behaviour("v2", error_rate=0.5)
    faulted_at = time.time()
    wait_until(lambda: stage.sampler.weight() == 0, 45, interval=0.05, what="canary weight 0 at Envoy")
    at_envoy = load.snapshot()
    first_5xx = at_envoy.first_status_5xx_at
    zero_at = stage.sampler.first_at(lambda w: w == 0, faulted_at)
    assert first_5xx is not None and zero_at is not None, stage.evidence()
    rollout = stage.rollout()
    overview = stage.overview()
    said = {"phase": rollout.phase, "weight": rollout.weight, "state_error": rollout.state_error,
            "serving": overview.health.serving}
    saved_while_full = stage.saved()
    assert rollout.phase == "RolledBack" and FULL in rollout.state_error, (said, stage.evidence())
    assert not stage.serving()
    assert saved_while_full == ("Progressing", 20), saved_while_full  # the rollback is not saved yet
    since_zero = next_requests(load)

    free_s = free_and_wait_for_serving(stage)
    wait_until(lambda: stage.saved() == ("RolledBack", 0), 10, what="the rollback saved")
    assert stage.rollout().state_error == ""

    stage.plane.current.stop()
    restarted_at = time.time()
    stage.plane.start()
    wait_until(lambda: stage.plane.proxy_connected(NODE), 30, what="Envoy to reconnect after the restart")
    wait_until(lambda: stage.rollout().phase == "RolledBack", 10, what="RolledBack restored")
    load.wait_for_requests(100, timeout=20)
    result = load.stop()
    assert stage.sampler.max_since(restarted_at) == 0, stage.sampler.changes(restarted_at)

    stage.record(
        test,
        **full,
        status_first_line=status_lines[0],
        first_5xx_to_envoy_0_s=zero_at - first_5xx,
        failed_requests_before_fault=before.failed,
        failed_requests_fault_to_envoy_0=at_envoy.failed - before.failed,
        failed_in_100_requests_after_envoy_0=since_zero.get("failed", 0),
        status_said_at_envoy_0=said,
        envoy_weight_at_status=0,
        saved_while_full=saved_while_full,
        freed_to_serving_s=free_s,
        saved_after_free=stage.saved(),
        restart_envoy_max_canary_weight=stage.sampler.max_since(restarted_at),
        requests=result.total,
        failed=result.failed,
        canary_weight_changes=stage.sampler.changes(faulted_at),
        engine_errors_logged=len(stage.engine_errors()),
    )
    stage.write_results(test)
    assert zero_at - first_5xx < 30, stage.evidence()
    assert since_zero.get("failed", 0) == 0 and set(since_zero) <= {"v1", "failed"}, since_zero


# ------------------------------------------------------------------------------ (b) a healthy canary waits


def test_healthy_canary_does_not_step_up_while_the_disk_is_full(
    stage_factory: StageFactory, loadgen_factory: LoadgenFactory
) -> None:
    test = "healthy_canary_waits_for_the_disk"
    interval = 3.0
    stage = stage_factory("tmpfs")
    load = start_load(stage, loadgen_factory)
    stage.write_policy("v2", {"steps": [20, 50], "interval": f"{interval:g}s"})
    wait_until(lambda: stage.weights() == {OLD: 80, CANARY: 20}, 20, interval=0.02, what="Envoy at 20 % v2")
    full = fill_and_wait_for_not_serving(stage)
    full_at = time.time()

    # The step ends after `interval`; its step up cannot be saved, so it must wait.
    held = wait_until(lambda: stage.held_rollout(interval), 30, what="the step up to be held back for the save")
    assert held is not None
    assert FULL in held.state_error and held.weight == 20, (held, stage.evidence())
    assert stage.sampler.max_since(full_at) == 20 and stage.weights() == {OLD: 80, CANARY: 20}, stage.evidence()
    said = {"phase": held.phase, "weight": held.weight, "seconds_in_step": round(held.seconds_in_step, 1),
            "state_error": held.state_error}

    freed = time.time()
    free_s = free_and_wait_for_serving(stage)
    wait_until(lambda: stage.sampler.weight() == 50, 20, interval=0.02, what="Envoy at 50 % once space is freed")
    at_50 = stage.sampler.first_at(lambda w: w == 50, freed)
    wait_until(lambda: stage.weights() == {CANARY: 100}, 30, what="promotion to v2 at Envoy")
    result = load.stop()
    assert at_50 is not None
    stage.record(
        test,
        **full,
        interval_s=interval,
        status_said_while_full=said,
        envoy_max_weight_while_full=max((w for at, w in stage.sampler.samples if full_at <= at < freed), default=0),
        freed_to_serving_s=free_s,
        freed_to_envoy_50_s=at_50 - freed,
        canary_weight_changes=stage.sampler.changes(full_at),
        requests=result.total,
        failed=result.failed,
    )
    stage.write_results(test)
    assert result.failed == 0, result.failures
    assert [w for _, w in stage.sampler.changes(full_at)] == [20, 50, 100], stage.sampler.changes(full_at)


# ------------------------------------------------------------------------------ (c) a new version waits


def test_version_change_while_the_disk_is_full_is_applied_once_space_returns(
    stage_factory: StageFactory, loadgen_factory: LoadgenFactory
) -> None:
    test = "version_change_with_disk_full"
    stage = stage_factory("tmpfs")
    load = start_load(stage, loadgen_factory)
    full = fill_and_wait_for_not_serving(stage)
    written_at = time.time()
    stage.write_policy("v2", {"steps": [50], "interval": "2s"})
    overview = wait_until(stage.policy_waiting, 15, what="status to show the policy change waiting")
    assert overview is not None
    rollout = next(r for r in overview.rollouts if r.name == NAME)
    assert (rollout.phase, rollout.stable_version, rollout.canary_version) == ("Stable", "v1", ""), rollout
    assert stage.weights() == {OLD: 100}
    said = {"phase": rollout.phase, "stable": rollout.stable_version, "problems": list(overview.health.problems)}

    freed = time.time()
    free_s = free_and_wait_for_serving(stage)
    wait_until(lambda: stage.sampler.weight() == 50, 20, interval=0.02, what="Envoy at 50 % v2 once space is freed")
    at_50 = stage.sampler.first_at(lambda w: w == 50, freed)
    wait_until(lambda: stage.weights() == {CANARY: 100}, 30, what="v2 promoted at Envoy")
    result = load.stop()
    assert at_50 is not None
    stage.record(
        test,
        **full,
        status_said_while_full=said,
        envoy_max_weight_while_full=max((w for at, w in stage.sampler.samples if written_at <= at < freed),
                                        default=0),
        freed_to_serving_s=free_s,
        freed_to_envoy_50_s=at_50 - freed,
        requests=result.total,
        failed=result.failed,
    )
    stage.write_results(test)
    assert result.failed == 0, result.failures
    assert stage.saved() == ("Stable", 0)


# ------------------------------------------------------------------------------ (d) read-only


def test_failing_canary_is_rolled_back_at_envoy_when_the_state_disk_turns_read_only(
    stage_factory: StageFactory, loadgen_factory: LoadgenFactory
) -> None:
    test = "failing_canary_rolled_back_with_read_only_disk"
    stage = stage_factory("ext4", prometheus=True)
    load = start_load(stage, loadgen_factory)
    stage.write_policy("v2", {"steps": [20, 50], "interval": "120s"}, analysis=True)
    wait_until(lambda: stage.weights() == {OLD: 80, CANARY: 20}, 20, what="Envoy at 20 % v2")
    stage.disk.turn_read_only()
    wait_until(lambda: not stage.serving(), 10, interval=0.05, what="health NOT_SERVING on a read-only disk")
    state_error = stage.overview().health.state_error
    assert str(stage.plane.state) in state_error and "Read-only file system" in state_error, state_error

    before = load.snapshot()
    stage.backends.set_behaviour("v2", error_rate=0.5)
    faulted_at = time.time()
    wait_until(lambda: stage.sampler.weight() == 0, 45, interval=0.05, what="canary weight 0 at Envoy")
    at_envoy = load.snapshot()
    zero_at = stage.sampler.first_at(lambda w: w == 0, faulted_at)
    assert at_envoy.first_status_5xx_at is not None and zero_at is not None
    rollout = stage.rollout()
    assert rollout.phase == "RolledBack" and rollout.state_error, (rollout, stage.evidence())
    status_first_line = stage.status_text().splitlines()[0]
    assert status_first_line.startswith("STATE NOT SAVED: "), status_first_line
    quiet = next_requests(load)
    result = load.stop()
    stage.record(
        test,
        health_state_error=state_error,
        status_first_line=status_first_line,
        first_5xx_to_envoy_0_s=zero_at - at_envoy.first_status_5xx_at,
        failed_requests_fault_to_envoy_0=at_envoy.failed - before.failed,
        status_said_at_envoy_0={"phase": rollout.phase, "weight": rollout.weight, "state_error": rollout.state_error},
        requests=result.total,
        failed=result.failed,
    )
    stage.write_results(test)
    assert zero_at - at_envoy.first_status_5xx_at < 30, stage.evidence()
    assert quiet.get("failed", 0) == 0, quiet
