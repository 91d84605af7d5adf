"""One `aviary serve` per state file and per port, through real processes and a real Envoy.

Instance A (`aviary serve` subprocess, tests/rig/serve_process.py) serves one Envoy a paused canary
at 10 %. A second instance B is then started against A's state file (with other ports, and with
``--reset-state``), or on one of A's ports with a state file of its own. Before the fix B ran
beside A: it advanced A's paused canary on time alone, saved an empty proxy list over A's, deleted
the database under A with ``--reset-state``, or shared A's ports through SO_REUSEPORT.

Also at start: a state file that is read-only, or a directory, stops a restart with one line naming
the file and the OS error (it used to be a traceback), while Envoy keeps its last weights.

What must hold: B exits with status 2 at once, printing exactly one line that names the state
file and A's PID (or the flag and address of the busy port); nothing of A's state changes (the file
is the same inode, the rollout and the saved proxy list are as before); Envoy still serves A's
weights; and A keeps working (a set-weight through A's admin API reaches Envoy and A's state file).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import _FAILED, EnvoyFactory
from tests.rig.backends import Backends
from tests.rig.envoy import EnvoyProcess
from tests.rig.git_repo import GitRepo
from tests.rig.ports import free_ports
from tests.rig.process import ManagedProcess
from tests.rig.serve_process import AVIARY, AviaryServe, saved_rollout
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"
REFUSAL_SECONDS = 15.0  # B must exit by then; before the fix it ran on


def policy_text(port: int, version: str, endpoint: str) -> str:
    spec: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": port},
        "hosts": [HOST],
        "version": version,
        "endpoints": [endpoint],
        "strategy": {"steps": [10, 40], "interval": "2s"},  # B would advance it on time alone
    }
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": NAME}, "spec": spec}
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Stage:
    workdir: Path
    policies: Path
    a: AviaryServe
    envoy: EnvoyProcess
    port: int

    @property
    def route(self) -> str:
        return f"route-127.0.0.1-{self.port}"

    def wait_envoy(self, weights: dict[str, int], timeout: float = 10.0) -> None:
        self.envoy.wait_rollout_weights(self.route, NAME, weights, timeout)

    def saved(self) -> tuple[str, int, list[str]]:
        """(phase, weight, proxies saved as served) from A's state file, read-only."""
        status = saved_rollout(self.a.state, NAME)
        assert status is not None
        db = sqlite3.connect(f"file:{self.a.state}?mode=ro", uri=True, timeout=2.0)
        try:
            (alive,) = db.execute("SELECT value FROM meta WHERE key = 'alive'").fetchone()
        finally:
            db.close()
        return status["phase"], status["weight"], sorted(yaml.safe_load(alive)["proxies"])

    def second(self, state: Path, name: str = "b") -> AviaryServe:
        """Another `aviary serve` on the same policies, with free ports of its own."""
        return AviaryServe(self.workdir / name, self.policies, state)


@pytest.fixture
def stage(
    workdir: Path, backends: Backends, envoy_factory: EnvoyFactory, request: pytest.FixtureRequest
) -> Iterator[Stage]:
    """A serves Envoy a canary paused at 10 % (v2), with its proxy list saved."""
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    (port,) = free_ports(1)
    a = AviaryServe(workdir / "a", policies, workdir / "state" / "state.db")
    (policies / f"{NAME}.yaml").write_text(policy_text(port, "v1", backends.address("v1")))
    try:
        a.start()
        envoy = envoy_factory(a.xds_port, node_id=NODE)
        stage = Stage(workdir, policies, a, envoy, port)
        envoy.wait_ready()
        stage.wait_envoy({"v1": 100})
        tmp = policies / f".{NAME}.yaml.tmp"
        tmp.write_text(policy_text(port, "v2", backends.address("v2")))
        tmp.replace(policies / f"{NAME}.yaml")
        stage.wait_envoy({"v1": 90, "v2": 10})
        # set-weight, not pause: it holds the canary at 10 % even when the 2 s step has already
        # moved on (a CLI call can take that long on a loaded machine).
        a.cli("set-weight", NAME, "10")
        stage.wait_envoy({"v1": 90, "v2": 10})
        wait_until(lambda: stage.saved() == ("Paused", 10, [NODE]), 10, what="A's state: paused at 10, envoy-1 saved")
        yield stage
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {a.describe()}")
        a.stop()


def refused(proc: ManagedProcess) -> tuple[int, list[str]]:
    """Wait for ``proc`` to exit; (exit status, the non-empty lines it printed)."""
    try:
        code = proc.wait(REFUSAL_SECONDS)
    except TimeoutError:
        proc.stop()
        raise AssertionError(
            f"the second instance is still running after {REFUSAL_SECONDS} s:\n{proc.describe()}"
        ) from None
    return code, [line for line in proc.log_text().splitlines() if line.strip()]


def a_still_works(stage: Stage) -> None:
    """Envoy still has A's weights, A's admin API moves them, and A's state file records it."""
    stage.wait_envoy({"v1": 90, "v2": 10}, timeout=2)
    stage.a.current.ensure_alive()
    stage.a.cli("set-weight", NAME, "30")
    stage.wait_envoy({"v1": 70, "v2": 30})
    wait_until(lambda: stage.saved()[:2] == ("Paused", 30), 5, what="A's set-weight in its state file")


def test_a_second_instance_on_the_same_state_file_is_refused(stage: Stage) -> None:
    before = stage.saved()
    b = stage.second(stage.a.state)
    started = time.monotonic()
    code, lines = refused(b.spawn())
    took = time.monotonic() - started
    print(f"\n[single-instance] same state file: exit {code} after {took:.2f} s: {lines}")
    assert code == 2, lines
    assert lines == [
        f"aviary serve: state file {stage.a.state} is in use by another aviary serve (pid {stage.a.current.pid}); "
        "stop it or use another --state"
    ]
    assert stage.saved() == before  # still paused at 10, envoy-1 still the saved proxy
    a_still_works(stage)


def test_reset_state_against_a_running_instance_deletes_nothing(stage: Stage) -> None:
    inode = os.stat(stage.a.state).st_ino
    before = stage.saved()
    code, lines = refused(stage.second(stage.a.state).spawn("--reset-state"))
    print(f"\n[single-instance] --reset-state: exit {code}: {lines}")
    assert code == 2, lines
    assert len(lines) == 1 and f"pid {stage.a.current.pid}" in lines[0], lines
    assert os.stat(stage.a.state).st_ino == inode  # the same file, not deleted and re-created
    assert stage.saved() == before
    a_still_works(stage)  # and A's writes land in the file a restart will read


@pytest.mark.parametrize("which", ["xds", "admin", "metrics"])
def test_a_second_instance_on_a_busy_port_is_refused(stage: Stage, which: str) -> None:
    b = stage.second(stage.workdir / "b-state" / "state.db")
    setattr(b, f"{which}_port", getattr(stage.a, f"{which}_port"))
    code, lines = refused(b.spawn())
    print(f"\n[single-instance] same {which} port: exit {code}: {lines}")
    assert code == 2, lines
    port = getattr(stage.a, f"{which}_port")
    assert lines == [f"aviary serve: --{which}-address 127.0.0.1:{port}: address already in use"]
    assert not b.state.exists()  # refused before it touched any state
    a_still_works(stage)


def test_one_git_working_copy_per_state_dir(workdir: Path) -> None:
    """--state elsewhere but the same --state-dir: the git working copy there is A's alone."""
    repo = GitRepo(workdir / "repo")
    repo.commit({"policies/README.md": "none yet\n"})
    state_dir = workdir / "state-dir"

    def serve(name: str, state: Path) -> ManagedProcess:
        xds, admin, metrics = free_ports(3)
        args = [
            str(AVIARY), "serve", "--policies", str(repo.path), "--git-path", "policies",
            "--state-dir", str(state_dir), "--state", str(state),
            "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
            "--metrics-address", f"127.0.0.1:{metrics}",
        ]  # fmt: skip
        return ManagedProcess(name, args, workdir / name).start()

    a = serve("a", workdir / "a.db")
    try:
        def cloned() -> bool:
            a.ensure_alive()
            return (state_dir / "git").is_dir()

        wait_until(cloned, 20, what="A's git working copy")
        code, lines = refused(serve("b", workdir / "b.db"))
        assert code == 2, lines
        assert lines == [
            f"aviary serve: git working copy {state_dir / 'git'} is in use by another aviary serve "
            f"(pid {a.pid}); stop it or use another --state-dir"
        ]
        assert not (workdir / "b.db").exists()
        a.ensure_alive()
    finally:
        a.stop()


# ------------------------------------------------------------------------------ unusable state at start


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str]:
    """``path`` read-only for `aviary serve`: a read-only bind mount as root (mode bits do not stop
    root), mode 0444 otherwise; yields the OS error to expect."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield "Permission denied"
        finally:
            path.chmod(0o644)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"root, but cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_restart_on_an_unusable_state_file_is_one_line_and_envoy_keeps_serving(stage: Stage) -> None:
    """Read-only state file, then a directory where the file should be: exit 2 with the file and
    the OS error, no traceback; Envoy keeps A's last weights; fixed, the restart resumes them."""
    state = stage.a.state
    assert stage.a.current.stop() == 0
    with read_only(state) as reason:
        code, lines = refused(stage.a.spawn())
    print(f"\n[single-instance] read-only state file: exit {code}: {lines}")
    assert (code, lines) == (2, [f"aviary serve: state file {state} cannot be used: {reason}"])

    state.rename(state.with_name("kept.db"))
    state.mkdir()
    code, lines = refused(stage.a.spawn())
    print(f"[single-instance] directory as state file: exit {code}: {lines}")
    assert (code, lines) == (2, [f"aviary serve: state file {state} cannot be used: Is a directory"])
    stage.wait_envoy({"v1": 90, "v2": 10}, timeout=2)  # Envoy kept what it had

    state.rmdir()
    state.with_name("kept.db").rename(state)
    stage.a.start()
    wait_until(lambda: stage.a.proxy_connected(NODE), 30, what=f"{NODE} back on A")
    assert stage.saved()[:2] == ("Paused", 10)
    a_still_works(stage)
