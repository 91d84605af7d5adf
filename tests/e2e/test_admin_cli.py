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
from tests.rig.serve_process import AVIARY, AviaryServe
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
    (shop,) = stage.cli_json("status")["rollouts"]
    assert (shop["name"], shop["phase"], shop["stable_version"], shop["canary_version"]) == (
        NAME, "Progressing", "v1", "v2"
    )
    assert (shop["weight"], shop["step"], shop["steps"], shop["step_weight"]) == (20, 1, 2, 20)  # 1-based, as the text
    assert "1/2" in stage.cli("status").stdout

    # set-weight: a manual weight, automation paused; it says where resume goes
    said = stage.cli("set-weight", NAME, "40").stdout.splitlines()
    assert "weight set to 40% by admin" in said[0]
    assert said[1:] == ["automation paused; `aviary resume` returns to step 1's weight 20%"]
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
    assert stage.envoy_weights() == {f"{NAME}_v1": 80, f"{NAME}_v2": 20}
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
    assert stage.envoy_weights() == {f"{NAME}_v1": 80, f"{NAME}_v2": 20}  # nothing was applied

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
    assert json.loads(done.stdout)["rollouts"][0]["weight"] == 20


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

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in json_watch.log_text().splitlines() if line.startswith("{")]

        def events() -> list[dict[str, Any]]:
            return [line for line in lines() if "rollout" in line]

        # First the rollout as it was when the watch began (a Rollout: "name"), then events ("rollout").
        first = lines()[0]
        assert (first["name"], first["phase"], first["weight"], first["step"]) == (NAME, "Progressing", 20, 1)
        assert "rollout" not in lines()[0] and all("name" not in line for line in lines()[1:])

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


# ---- `aviary serve` as a process: what it refuses, and what its signals say -------------------


def measured_policy(policies: Path, port: int, backends: Backends, version: str) -> Path:
    """The policy of `write_policy` plus an analysis that names no Prometheus (checkEvery 1h: no check
    round runs during the test, so an accepted canary just stays at its first step)."""
    write_policy(policies, port, backends, version, (20, 50))
    path = policies / f"{NAME}.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["analysis"] = {
        "checkEvery": "1h", "inconclusiveLimit": 0,
        "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def messages(serve: AviaryServe, proc: ManagedProcess) -> list[str]:
    return [f"{e.get('level')}: {e.get('message')}" for e in serve.log_entries(proc)]


def test_serve_refuses_analysis_without_prometheus_and_logs_its_signals(
    workdir: Path, backends: Backends, envoy_factory: EnvoyFactory
) -> None:
    """Before: `aviary serve` without --prometheus-url took such a file, started the canary (20 % at
    Envoy) and rolled it back as "inconclusive" with no check rows and no log line; signals left no
    line in the log. Now the file is refused like an invalid one (status and the log say why, v1
    keeps all the traffic at Envoy), `validate --remote` says the same, and each signal is logged."""
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    port = free_port()
    write_policy(policies, port, backends, "v1", (20, 50))
    serve = AviaryServe(workdir / "aviary", policies, workdir / "state.db")
    try:
        first = serve.start()
        envoy = envoy_factory(serve.xds_port)
        envoy.wait_ready()
        route = f"route-127.0.0.1-{port}"
        envoy.wait_rollout_weights(route, NAME, {"v1": 100}, 15)

        path = measured_policy(policies, port, backends, "v2")
        line = f"{path}: spec.analysis.prometheus: analysis needs a Prometheus: set analysis.prometheus or pass " \
               "--prometheus-url"
        policy = wait_until(lambda: (p := serve.cli_json("status")["policy"])["errors"] and p, 15,
                            what="status to show the refused file")
        assert [f"{e['file']}: {e['field']}: {e['reason']}" for e in policy["errors"]] == [line]
        assert f"error: policy refused: {line}" in messages(serve, first)
        # The running version keeps serving: no canary was started, Envoy still sends everything to v1.
        shop = serve.cli_json("status", NAME)
        assert (shop["phase"], shop["stable_version"], shop["canary_version"]) == ("Stable", "v1", ""), shop
        assert envoy.route_weights(route)[NAME] == {f"{NAME}_v1": 100}
        assert line in serve.cli("status").stdout.replace("\n", "")  # the text too (wrapped at COLUMNS)

        # validate --remote: the server checks with its own (absent) --prometheus-url
        remote = subprocess.run(
            [str(AVIARY), "validate", "--remote", str(path), "--admin", f"127.0.0.1:{serve.admin_port}"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert (remote.returncode, remote.stdout.strip()) == (1, line), remote.stderr

        first.send_signal(signal.SIGHUP)
        wait_until(lambda: "info: reloading policies (SIGHUP)" in messages(serve, first), 10, what="the SIGHUP line")
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0, first.describe()
        said = messages(serve, first)
        assert said.count("info: shutting down (SIGTERM), grace period 1s") == 1, said[-5:]

        # With a Prometheus for the server the same file is valid: the canary starts.
        second = serve.start("--prometheus-url", f"http://127.0.0.1:{free_port()}")
        envoy.wait_rollout_weights(route, NAME, {"v1": 80, "v2": 20}, 15)
        assert serve.cli_json("status")["policy"]["errors"] == []
        second.send_signal(signal.SIGINT)
        assert second.wait(15) == 0, second.describe()
        assert "info: shutting down (SIGINT), grace period 1s" in messages(serve, second)
    finally:
        serve.stop()
