"""Policies from a git repository, through a real Envoy, seen through the `aviary` CLI.

The policy repository is a plain (non-bare) git repository in tmp_path that the tests commit to;
the control plane runs in process (tests/rig/control_plane.py) with ``policies`` set to that
repository, a 0.2 s git poll, and its admin API on a kernel-picked port with a token, so that
every status is read by ``python -m aviary ...`` in a subprocess. Two rollouts share one Envoy
listener by host name: ``shop`` (the one that changes) and ``cart`` (the one that goes away).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.admin.server import AdminConfig
from aviary.app import ControlPlane, ServeConfig
from aviary.discovery import typeurls
from aviary.discovery.cache import DEFAULT_GROUP
from aviary.discovery.resources import cluster_name
from aviary.discovery.snapshot import Snapshot
from aviary.policy.git_source import STALE_LOCK_AGE
from tests.conftest import ControlPlaneFactory, EnvoyFactory
from tests.rig.admin_cli import run_cli, write_token_file
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane
from tests.rig.envoy import EnvoyProcess
from tests.rig.git_repo import GitRepo
from tests.rig.ports import free_port
from tests.rig.simple_http import HttpResponse, http_request
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TOKEN = "e2e-git-token"
SHOP, CART = "shop", "cart"
HOSTS = {SHOP: "shop.example.com", CART: "cart.example.com"}
GIT_POLL = 0.2
DEADLINE = 15.0


def rollout_yaml(
    name: str, port: int, version: str, endpoint: str, steps: list[int] | None = None
) -> str:
    spec: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": port},
        "hosts": [HOSTS[name]],
        "version": version,
        "endpoints": [endpoint],
    }
    if steps is not None:
        spec["strategy"] = {"steps": steps, "interval": "1h"}  # nothing advances by itself
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": name}, "spec": spec}
    return yaml.safe_dump(doc, sort_keys=False)


def route_clusters(snapshot: Snapshot, route: str) -> frozenset[str]:
    resource = snapshot.items(typeurls.ROUTE).get(route)
    return resource.references if resource is not None else frozenset()


@dataclass
class Stage:
    repo: GitRepo
    backends: Backends
    plane: RunningControlPlane
    envoy: EnvoyProcess
    port: int
    admin: str
    token_file: Path
    first_commit: str
    published: list[Snapshot] = field(default_factory=list)  # every default-group snapshot, in order

    @property
    def route(self) -> str:
        return f"route-127.0.0.1-{self.port}"

    # ---- policies ------------------------------------------------------------------------
    def policy(self, name: str, version: str = "v1", steps: list[int] | None = None) -> str:
        endpoint = self.backends.address(version if name == SHOP else CART)
        return rollout_yaml(name, self.port, version, endpoint, steps)

    def reload(self) -> None:
        """Poll the repository now (what SIGHUP does) rather than at the next 0.2 s tick."""
        self.plane.call(lambda p: p.watcher.reload())

    def policy_state(self) -> Any:
        return self.plane.call(lambda p: p.policy_state())

    def wait_applied(self, sha: str) -> None:
        def applied() -> bool:
            self.reload()
            return bool(self.plane.call(lambda p: p.runner.revision) == sha)

        wait_until(applied, DEADLINE, what=f"commit {sha[:7]} to be applied")

    # ---- the CLI -------------------------------------------------------------------------
    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        # rich wraps at 80 columns when not on a terminal
        return run_cli(self.admin, self.token_file, *args, ok=ok, env={"COLUMNS": "200"})

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    # ---- Envoy ---------------------------------------------------------------------------
    def weights(self, name: str) -> dict[str, int] | None:
        """Envoy's weights for a rollout's virtual host; None when Envoy has no such host."""
        return self.envoy.route_weights(self.route).get(name)

    def wait_envoy(self, name: str, weights: dict[str, int], timeout: float = DEADLINE) -> float:
        """Wait for Envoy to route ``name`` with these version weights; return the seconds it took."""
        start = time.monotonic()
        self.envoy.wait_rollout_weights(self.route, name, weights, timeout, interval=0.02)
        return time.monotonic() - start

    def get(self, name: str) -> HttpResponse:
        return http_request(self.port, "/", headers={"Host": HOSTS[name]}, timeout=5.0)

    def assert_serves(self, name: str, body: str, requests: int = 20) -> None:
        bodies = [(r.status, r.body) for r in (self.get(name) for _ in range(requests))]
        assert bodies == [(200, body)] * requests


StageFactory = Callable[..., Stage]


@pytest.fixture
def stage_factory(
    workdir: Path, backends: Backends, control_plane_factory: ControlPlaneFactory, envoy_factory: EnvoyFactory
) -> Iterator[StageFactory]:
    """``stage_factory(prune=False, steps=None)``: backends, the policy repository with shop and cart at v1,
    the plane serving it, and Envoy routing both; every process is stopped by the fixtures it uses."""
    def make(prune: bool = False, steps: list[int] | None = None) -> Stage:
        backends.start(["v1", "v2", CART])
        port = free_port()
        repo = GitRepo(workdir / "policy-repo")
        shop = rollout_yaml(SHOP, port, "v1", backends.address("v1"), steps)
        cart = rollout_yaml(CART, port, "v1", backends.address(CART))
        first = repo.commit({f"{SHOP}.yaml": shop, f"{CART}.yaml": cart, "README.md": "policies\n"}, "shop and cart")
        token_file = write_token_file(workdir / "admin-token", TOKEN)
        published: list[Snapshot] = []

        async def serve_from_git(plane: ControlPlane) -> None:
            # The rig boots a plane on an (empty) directory. The policy source, prune and the admin
            # API are chosen when a ControlPlane is built, so rebuild this one from the git config
            # before it serves, and load the repository's head.
            config = ServeConfig(
                policies=str(repo.path),
                git_poll=GIT_POLL,
                state_dir=workdir / "aviary-state",
                xds_address="127.0.0.1:0",
                prune=prune,
                admin=AdminConfig("127.0.0.1:0", token_file=token_file),
            )
            ControlPlane.__init__(plane, config)
            publish = plane.cache.publish

            def recording_publish(snapshots: Any) -> bool:
                changed = publish(snapshots)
                if changed:
                    published.append(plane.cache.snapshots[DEFAULT_GROUP])
                return changed

            plane.cache.publish = recording_publish  # type: ignore[method-assign]
            await plane.load()

        empty = workdir / "unused-policy-dir"
        plane = control_plane_factory(empty, start=False).start(hook=serve_from_git)
        admin = f"127.0.0.1:{plane.call(lambda p: p.admin_port)}"
        envoy = envoy_factory(plane.xds_port)
        envoy.wait_ready()
        stage = Stage(repo, backends, plane, envoy, port, admin, token_file, first, published)
        stage.wait_envoy(SHOP, {"v1": 100})
        stage.wait_envoy(CART, {"v1": 100})
        return stage

    yield make


# ---------------------------------------------------------------------------------------- tests


def test_a_valid_commit_applies_and_status_names_it(stage_factory: StageFactory) -> None:
    stage = stage_factory()
    sha = stage.first_commit
    stage.assert_serves(SHOP, "v1")
    stage.assert_serves(CART, CART)

    listing = stage.cli_json("status")["rollouts"]
    assert [(r["name"], r["phase"], r["stable_version"], r["git_commit"]) for r in listing] == [
        (CART, "Stable", "v1", sha), (SHOP, "Stable", "v1", sha)
    ]
    detail = stage.cli_json("status", SHOP)
    assert (detail["git_commit"], detail["orphaned"]) == (sha, False)

    text = stage.cli("status").stdout
    assert f"policies: {stage.repo.path}  applied commit {sha[:12]}" in text
    assert "rejected" not in text
    assert f"git commit  {sha}" in stage.cli("status", SHOP).stdout

    # A second commit (a canary of shop) reaches Envoy through polling alone: no reload().
    committed = time.monotonic()
    second = stage.repo.commit({f"{SHOP}.yaml": stage.policy(SHOP, "v2", [30, 60])}, "shop v2")
    stage.wait_envoy(SHOP, {"v1": 70, "v2": 30})
    latency = time.monotonic() - committed
    print(f"commit -> Envoy route (poll {GIT_POLL}s, no reload): {latency * 1000:.0f} ms")
    assert stage.cli_json("status", SHOP)["git_commit"] == second
    assert f"applied commit {second[:12]}" in stage.cli("status").stdout


def test_a_broken_commit_is_refused_and_the_applied_one_keeps_serving(stage_factory: StageFactory) -> None:
    stage = stage_factory()
    good = stage.first_commit
    generation = stage.plane.call(lambda p: p.cache.generation)

    # One invalid field in one file; had it applied, shop would move to v2.
    broken = stage.repo.commit({f"{SHOP}.yaml": stage.policy(SHOP, "v2", [50, 20])}, "broken steps")

    def rejected() -> bool:
        stage.reload()
        return bool(stage.policy_state().rejected_commit == broken)

    wait_until(rejected, DEADLINE, what=f"commit {broken[:7]} to be rejected")
    text = stage.cli("status").stdout
    assert f"applied commit {good[:12]}" in text
    assert f"rejected commit {broken[:12]} (the applied one keeps serving):" in text
    assert f"  {broken[:7]}:{SHOP}.yaml: spec.strategy.steps[1]: weight 20 must exceed the previous weight (50)" in text
    listing = stage.cli_json("status")["rollouts"]
    assert [(r["name"], r["phase"], r["canary_version"], r["git_commit"]) for r in listing] == [
        (CART, "Stable", "", good), (SHOP, "Stable", "", good)
    ]

    # Envoy: nothing was pushed, the route is unchanged, requests still succeed.
    assert stage.plane.call(lambda p: p.cache.generation) == generation
    assert stage.weights(SHOP) == {f"{SHOP}_v1": 100}
    stage.assert_serves(SHOP, "v1")
    stage.assert_serves(CART, CART)

    # The fix applies and the rejection is gone.
    fixed = stage.repo.commit({f"{SHOP}.yaml": stage.policy(SHOP, "v1", [20, 50])}, "fix steps")
    stage.wait_applied(fixed)
    state = stage.policy_state()
    assert (state.applied_commit, state.rejected_commit, state.errors) == (fixed, None, ())
    text = stage.cli("status").stdout
    assert f"applied commit {fixed[:12]}" in text
    assert "rejected" not in text and broken[:7] not in text
    assert stage.cli_json("status", SHOP)["git_commit"] == fixed
    assert stage.weights(SHOP) == {f"{SHOP}_v1": 100}
    stage.assert_serves(SHOP, "v1")


def test_a_committed_version_bump_starts_a_canary(stage_factory: StageFactory) -> None:
    stage = stage_factory(steps=[20, 50])
    bump = stage.repo.commit({f"{SHOP}.yaml": stage.policy(SHOP, "v2", [20, 50])}, "shop v2")
    stage.reload()
    stage.wait_envoy(SHOP, {"v1": 80, "v2": 20})
    assert stage.weights(CART) == {f"{CART}_v1": 100}

    shop = stage.cli_json("status", SHOP)
    assert (shop["phase"], shop["stable_version"], shop["canary_version"], shop["weight"]) == (
        "Progressing", "v1", "v2", 20
    )
    assert (shop["step"], shop["steps"], shop["git_commit"]) == (1, 2, bump)  # 1-based, like "1/2" below
    text = stage.cli("status").stdout
    assert f"applied commit {bump[:12]}" in text
    (row,) = [line.split() for line in text.splitlines() if line.startswith(SHOP)]
    assert row[:6] == [SHOP, "Progressing", "v1", "v2", "20%", "1/2"]

    bodies = {stage.get(SHOP).body for _ in range(60)}
    assert bodies == {"v1", "v2"}  # 20% of 60 requests: v2 is all but certain to show up


def test_a_removed_file_keeps_serving_as_orphaned_without_prune(stage_factory: StageFactory) -> None:
    stage = stage_factory()
    removal = stage.repo.commit({f"{CART}.yaml": None}, "remove cart")
    stage.wait_applied(removal)

    assert stage.weights(CART) == {f"{CART}_v1": 100}
    assert f"{CART}_v1" in stage.envoy.cluster_names()
    stage.assert_serves(CART, CART)
    stage.assert_serves(SHOP, "v1")

    cart = stage.cli_json("status", CART)
    assert (cart["phase"], cart["stable_version"], cart["orphaned"]) == ("Stable", "v1", True)
    assert stage.cli_json("status", SHOP)["orphaned"] is False
    assert [r["name"] for r in stage.cli_json("status")["rollouts"]] == [CART, SHOP]
    assert "orphaned    its policy file is gone; it keeps serving" in stage.cli("status", CART).stdout
    assert f"applied commit {removal[:12]}" in stage.cli("status").stdout

    # The file coming back adopts the orphan again.
    back = stage.repo.commit({f"{CART}.yaml": stage.policy(CART)}, "cart is back")
    stage.wait_applied(back)
    assert stage.cli_json("status", CART)["orphaned"] is False


class Traffic:
    """Requests to one rollout's host in a loop on a thread, while something else happens."""

    def __init__(self, stage: Stage, name: str) -> None:
        self.stage = stage
        self.name = name
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-traffic", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(self.stage.get(self.name).status)
            except OSError as exc:
                self.errors.append(repr(exc))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_removed_file_is_pruned_make_before_break_with_prune(stage_factory: StageFactory) -> None:
    stage = stage_factory(prune=True)
    before = len(stage.published)
    with Traffic(stage, SHOP) as shop, Traffic(stage, CART) as cart:
        wait_until(lambda: 200 in cart.statuses, DEADLINE, what="a first request to cart")
        removal = stage.repo.commit({f"{CART}.yaml": None}, "remove cart")
        stage.reload()
        wait_until(lambda: stage.weights(CART) is None, DEADLINE, what="cart's virtual host to go")
        wait_until(lambda: f"{CART}_v1" not in stage.envoy.cluster_names(), DEADLINE, what="cart's cluster to go")
        wait_until(lambda: cart.statuses.count(404) >= 20, DEADLINE, what="20 requests to cart after it went")
    assert (shop.errors, set(shop.statuses)) == ([], {200})  # shop never noticed
    # cart was served until its virtual host went, then Envoy had no route for it: never a 503
    # (the route naming a cluster Envoy no longer has) on the way.
    assert cart.errors == []
    first_404 = cart.statuses.index(404)
    assert set(cart.statuses[:first_404]) == {200} and set(cart.statuses[first_404:]) == {404}, cart.statuses

    # In the control plane: the route let go of cart's cluster in an earlier snapshot than the one
    # that removed the cluster (the director waits for Envoy's ACK of that route in between).
    history = [
        (f"{CART}_v1" in route_clusters(s, stage.route), f"{CART}_v1" in s.items(typeurls.CLUSTER))
        for s in stage.published[before - 1 :]
    ]  # (route names cart_v1, cluster cart_v1 exists), per snapshot
    assert history[0] == (True, True) and history[-1] == (False, False), history
    assert (False, True) in history and (True, False) not in history, history

    assert stage.weights(SHOP) == {f"{SHOP}_v1": 100}
    assert [r["name"] for r in stage.cli_json("status")["rollouts"]] == [SHOP]
    gone = stage.cli("status", CART, ok=False)
    assert (gone.returncode, gone.stderr.strip()) == (
        1, f"aviary status: not found: no rollout named '{CART}' (known: {SHOP})"
    )
    assert f"applied commit {removal[:12]}" in stage.cli("status").stdout


def test_a_stale_git_lock_heals_and_fetch_errors_show_in_status(stage_factory: StageFactory) -> None:
    stage = stage_factory(steps=[30, 60])
    working_copy = stage.repo.path.parent / "aviary-state" / "git" / "repo.git"

    # What a git killed mid-fetch leaves behind: the lock of the ref it was updating. Before the fix,
    # every later fetch failed on it and no commit ever reached Envoy again.
    lock = working_copy / "refs" / "remotes" / "origin" / "main.lock"
    assert lock.parent.is_dir()
    lock.write_text("")
    committed = time.monotonic()
    bump = stage.repo.commit({f"{SHOP}.yaml": stage.policy(SHOP, "v2", [30, 60])}, "shop v2")
    stage.wait_envoy(SHOP, {"v1": 70, "v2": 30}, timeout=3 * STALE_LOCK_AGE)
    healed = time.monotonic() - committed
    print(f"stale ref lock: commit -> Envoy route in {healed:.1f}s (lock removed once {STALE_LOCK_AGE:g}s old)")
    assert not lock.exists()
    assert stage.cli_json("status", SHOP)["git_commit"] == bump
    assert stage.cli_json("status")["policy"]["fetch_error"] == ""

    # The remote goes away: status (text and JSON), the admin API and the metrics say so.
    away = stage.repo.path.with_name("policy-repo-away")
    stage.repo.path.rename(away)

    def failing() -> bool:
        stage.reload()
        return stage.policy_state().fetch_error is not None

    wait_until(failing, DEADLINE, what="the fetch error")
    text = stage.cli("status").stdout
    (line,) = [line for line in text.splitlines() if line.startswith("git fetch failing since ")]
    print(f"aviary status: {line}")
    assert re.fullmatch(r"git fetch failing since \d\d:\d\d:\d\d: git ls-remote: '.*policy-repo' does not appear "
                        r"to be a git repository", line), line
    assert f"applied commit {bump[:12]}" in text  # still serving the last commit
    fetch_error = stage.cli_json("status")["policy"]["fetch_error"]
    assert re.fullmatch(r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: git ls-remote: .*", fetch_error), fetch_error
    registry = stage.plane.call(lambda p: p.metrics.registry)
    assert registry.get_sample_value("aviary_policy_fetch_failing") == 1.0
    assert (registry.get_sample_value("aviary_policy_fetch_failures_total") or 0) >= 1
    assert stage.weights(SHOP) == {cluster_name(SHOP, "v1"): 70, cluster_name(SHOP, "v2"): 30}

    # It comes back: the error clears and the next commit applies.
    away.rename(stage.repo.path)
    fixed = stage.repo.commit({f"{SHOP}.yaml": stage.policy(SHOP, "v2", [40, 60])}, "shop v2, 40 % first")
    stage.wait_applied(fixed)
    assert stage.cli_json("status")["policy"]["fetch_error"] == ""
    assert "fetch failing" not in stage.cli("status").stdout
    assert registry.get_sample_value("aviary_policy_fetch_failing") == 0.0
