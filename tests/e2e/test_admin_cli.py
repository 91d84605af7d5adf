"""Operating a rollout through the `aviary` CLI, against a real Envoy.

The control plane runs in process (tests/rig/control_plane.py) with its admin API on a kernel-picked
port and a bearer token; every CLI call is `python -m aviary ...` in a subprocess with --admin and
--token-file. The policy has a strategy (steps 20, 50; interval 1h) and no analysis, so the canary
only moves when the CLI moves it; each command is checked in Envoy's route weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.admin.server import AdminConfig
from aviary.app import ControlPlane
from tests.conftest import ControlPlaneFactory, EnvoyFactory
from tests.rig.admin_cli import cli_args, run_cli, write_token_file
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane
from tests.rig.envoy import EnvoyProcess
from tests.rig.ports import free_port
from tests.rig.process import ManagedProcess
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NAME = "shop"
TOKEN = "e2e-admin-token"


def write_policy(policies: Path, port: int, backends: Backends, version: str, steps: tuple[int, ...]) -> None:
    doc = {
        "apiVersion": "aviary.dev/v1",
        "kind": "Rollout",
        "metadata": {"name": NAME},
        "spec": {
            "listener": {"address": "127.0.0.1", "port": port},
            "hosts": ["*"],
            "version": version,
            "endpoints": [backends.address(version)],
            "strategy": {"steps": list(steps), "interval": "1h"},  # nothing advances by itself
        },
    }
    path = policies / f"{NAME}.yaml"
    tmp = policies / f".{NAME}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


@dataclass
class Stage:
    policies: Path
    backends: Backends
    plane: RunningControlPlane
    envoy: EnvoyProcess
    port: int
    admin: str
    token_file: Path
    workdir: Path

    def write_policy(self, version: str, steps: tuple[int, ...] = (20, 50)) -> None:
        write_policy(self.policies, self.port, self.backends, version, steps)

    def cli_args(self, *args: str) -> list[str]:
        return cli_args(self.admin, self.token_file, *args)

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.admin, self.token_file, *args, ok=ok)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--output", "json").stdout)

    def envoy_weights(self) -> dict[str, int]:
        return self.envoy.route_weights(f"route-127.0.0.1-{self.port}").get(NAME, {})

    def wait_envoy(self, weights: dict[str, int], timeout: float = 15.0) -> None:
        self.envoy.wait_rollout_weights(f"route-127.0.0.1-{self.port}", NAME, weights, timeout)

    def engine(self, fn: Any) -> Any:
        return self.plane.call(lambda p: fn(p.runner))


@pytest.fixture
def stage(
    workdir: Path, backends: Backends, control_plane_factory: ControlPlaneFactory, envoy_factory: EnvoyFactory
) -> Iterator[Stage]:
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    token_file = write_token_file(workdir / "admin-token", TOKEN)

    def with_admin(plane: ControlPlane) -> None:
        # The rig builds a ServeConfig without an admin API; add one before the plane serves.
        plane.config = dataclasses.replace(plane.config, admin=AdminConfig("127.0.0.1:0", token_file=token_file))

    port = free_port()
    write_policy(policies, port, backends, "v1", (20, 50))
    plane = control_plane_factory(policies, start=False).start(hook=with_admin)
    admin = f"127.0.0.1:{plane.call(lambda p: p.admin_port)}"
    envoy = envoy_factory(plane.xds_port)
    envoy.wait_ready()
    stage = Stage(policies, backends, plane, envoy, port, admin, token_file, workdir)
    stage.wait_envoy({"v1": 100})
    yield stage


def start_canary(stage: Stage, steps: tuple[int, ...] = (20, 50)) -> None:
    stage.write_policy("v2", steps)
    first = steps[0]
    stage.wait_envoy({"v1": 100 - first, "v2": first})


def test_every_command_changes_what_envoy_serves(stage: Stage) -> None:
    start_canary(stage)
    (shop,) = stage.cli_json("status")
    assert (shop["name"], shop["phase"], shop["stable_version"], shop["canary_version"]) == (
        NAME, "Progressing", "v1", "v2"
    )
    assert (shop["weight"], shop["step"], shop["steps"]) == (20, 0, 2)

    # set-weight: a manual weight, automation paused
    assert "weight set to 40% by admin" in stage.cli("set-weight", NAME, "40").stdout
    stage.wait_envoy({"v1": 60, "v2": 40})
    detail = stage.cli_json("status", NAME)
    assert detail["phase"] == "Paused"
    assert detail["overrides"] == [{"kind": "set-weight", "detail": "manual weight 40% until Resume"}]

    # resume: the step restarts at its own weight
    stage.cli("resume", NAME)
    stage.wait_envoy({"v1": 80, "v2": 20})

    # pause: a changed strategy no longer moves the canary ...
    assert stage.cli_json("pause", NAME)["phase"] == "Paused"
    stage.write_policy("v2", steps=(30, 60))
    wait_until(
        lambda: stage.engine(lambda r: r.rollout(NAME).spec.strategy.weights) == (30, 60),
        10, what="the engine to read the new steps",
    )
    assert stage.engine(lambda r: r.status(NAME).weight) == 20
    assert stage.envoy_weights() == {f"{NAME}-v1": 80, f"{NAME}-v2": 20}
    # ... until resume, which restarts the step with the file's weight
    stage.cli("resume", NAME)
    stage.wait_envoy({"v1": 70, "v2": 30})

    # abort: all traffic back to v1
    aborted = stage.cli_json("abort", NAME)
    assert (aborted["phase"], aborted["failed_version"]) == ("RolledBack", "v2")
    stage.wait_envoy({"v1": 100})

    # retry: the canary again, from the first step
    assert stage.cli_json("retry", NAME)["phase"] == "Progressing"
    stage.wait_envoy({"v1": 70, "v2": 30})

    # promote: all traffic to v2, which becomes stable once Envoy ACKed it
    stage.cli("promote", NAME)
    stage.wait_envoy({"v2": 100})
    wait_until(lambda: stage.cli_json("status", NAME)["phase"] == "Stable", 10, what="v2 to be stable")
    shop = stage.cli_json("status", NAME)
    assert (shop["stable_version"], shop["canary_version"], shop["weight"]) == ("v2", "", 0)
    assert [e["to_phase"] for e in shop["events"]][-2:] == ["Promoting", "Stable"]

    (proxy,) = stage.cli_json("proxies")
    assert (proxy["node_id"], proxy["node_cluster"]) == ("envoy-1", "edge")


def test_refused_calls_exit_non_zero_and_say_why(stage: Stage) -> None:
    done = stage.cli("promote", NAME, ok=False)
    assert done.returncode == 1
    assert done.stderr.strip() == "aviary promote: refused: shop: no canary: rollout is Stable"

    done = stage.cli("status", "nope", ok=False)
    assert done.returncode == 1
    assert done.stderr.strip() == "aviary status: not found: no rollout named 'nope' (known: shop)"

    start_canary(stage)
    done = stage.cli("set-weight", NAME, "150", ok=False)
    assert (done.returncode, done.stderr.strip()) == (
        1, "aviary set-weight: invalid argument: weight must be within 0..100, got 150"
    )

    wrong = stage.workdir / "wrong-token"
    wrong.write_text("guess")
    done = run_cli(stage.admin, wrong, "abort", NAME, ok=False)
    assert (done.returncode, done.stderr.strip()) == (1, "aviary abort: authentication failed: invalid token")
    args = [sys.executable, "-m", "aviary", "abort", NAME, "--admin", stage.admin]
    env = {k: v for k, v in os.environ.items() if k != "AVIARY_TOKEN_FILE"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("aviary abort: authentication failed: missing token")
    assert stage.envoy_weights() == {f"{NAME}-v1": 80, f"{NAME}-v2": 20}  # nothing was applied

    # validate --remote: the server checks the files and applies nothing.
    bad = stage.workdir / "bad.yaml"
    bad.write_text((stage.policies / f"{NAME}.yaml").read_text().replace("- 20", "- 70"))
    done = stage.cli("validate", "--remote", str(stage.policies / f"{NAME}.yaml"), str(bad), ok=False)
    assert (done.returncode, done.stdout.strip()) == (1, f"{bad}: spec.strategy.steps[1]: weight 50 must exceed "
                                                          "the previous weight (70)")

    # The environment names the server and the token as well.
    env = {**os.environ, "AVIARY_ADMIN": stage.admin, "AVIARY_TOKEN_FILE": str(stage.token_file)}
    done = subprocess.run(
        [sys.executable, "-m", "aviary", "status", "-o", "json"],
        capture_output=True, text=True, timeout=30, check=False, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["weight"] == 20


def watcher(stage: Stage, name: str, *args: str) -> ManagedProcess:
    return ManagedProcess(name, stage.cli_args("watch", NAME, *args), stage.workdir, env={"PYTHONUNBUFFERED": "1"})


def wait_subscribed(stage: Stage, process: ManagedProcess) -> None:
    """The watch prints this line once the server has subscribed it to transitions."""
    line = f"watching shop on {stage.admin}"
    wait_until(lambda: line in process.log_text(), 20, what=f"{process.name} to subscribe")


def test_watch_follows_changes_and_stops_cleanly_on_ctrl_c(stage: Stage) -> None:
    start_canary(stage)
    json_watch = watcher(stage, "watch-json", "--output", "json")
    live_watch = watcher(stage, "watch-live", "--refresh", "0.2")
    with json_watch, live_watch:  # started here, stopped on the way out whatever happens
        for process in (json_watch, live_watch):
            wait_subscribed(stage, process)
        stage.cli("set-weight", NAME, "45")
        stage.wait_envoy({"v1": 55, "v2": 45})

        def events() -> list[dict[str, Any]]:
            lines = json_watch.log_text().splitlines()
            return [json.loads(line) for line in lines if line.startswith("{")]

        acked = wait_until(
            lambda: [e for e in events() if "ACKed" in e["reason"] and e["weight"] == 45], 10, what="the ACK event"
        )
        assert acked[0]["rollout"] == NAME and acked[0]["canary_version"] == "v2"
        assert [e["weight"] for e in events()][:1] == [45]

        for process in (json_watch, live_watch):
            process.send_signal(signal.SIGINT)
            assert process.wait(10) == 0, process.describe()
            assert "Traceback" not in process.log_text(), process.describe()
    view = live_watch.log_text()
    assert "shop" in view and "45%" in view and "weight set to 45% by admin" in view
