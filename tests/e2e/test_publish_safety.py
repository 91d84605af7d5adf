"""Never publish what Envoy must reject; status follows Envoy (issue 8, faults 3 and 4).

`aviary serve` (a subprocess, state in tmp, admin API on loopback) serves one real Envoy under load
(tests/rig/loadgen.py, one generator per host). Rollouts share the listener 127.0.0.1:PORT, so
their virtual hosts share one RouteConfiguration: one rejected domain would freeze them all.

- rename without --prune: `r40` (canary at 20 %) is renamed `r40b` on the same host while `r20`'s
  canary also runs. Before the fix the orphan `r40` and `r40b` both carried the host, Envoy NACKed
  the route ("Only unique values for domains are permitted"), the plane rolled back every canary on
  the route in status only, and no later change reached Envoy. Now `r40b` is refused (status and
  log name the file, field and orphan), Envoy rejects nothing, `r20` keeps moving at Envoy.
- a host moved between two files in one change, then a rename under --prune: applied as one
  change each, Envoy rejects nothing, no request fails.
- cluster names that used to collide (`shop` at `eu-v1`, `shop-eu` at `v1`: both `shop-eu-v1`)
  are valid (`aviary validate`) and both serve; before, `serve` exited with "duplicate CDS resource".
- a rejected endpoint (a zoned IPv6 address Envoy cannot parse) of one of two rollouts on the
  route: only that rollout rolls back, the other canary stays at Envoy; the same endpoint on a
  stable version (nothing to roll back) shows in status as "Envoy rejected endpoints of cluster
  ..." while Envoy keeps what it had, until a good version is ACKed.
- an upgrade restart from the last commit with `<rollout>-<version>` names (run from `git archive`)
  and a second restart while those old-named clusters retire (a holding proxy still routes to
  them): they stay published until no proxy's route names them; no request fails, no_cluster 0.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.envoy import EnvoyProcess
from tests.rig.holding_proxy import HoldingProxy
from tests.rig.loadgen import LoadGenerator
from tests.rig.ports import free_ports, port_open
from tests.rig.process import ManagedProcess
from tests.rig.serve_process import AVIARY, AviaryServe
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NODE = "envoy-1"
REJECTED_ENDPOINT = "[fe80::1%nosuchif]:9"  # a valid IP to Python, not to Envoy's EDS (no such interface)


@dataclass
class Stage:
    workdir: Path
    backends: Backends
    policies: Path
    plane: AviaryServe
    port: int
    envoy: EnvoyProcess = field(init=False)

    @property
    def route(self) -> str:
        return f"route-127.0.0.1-{self.port}"

    def write(self, name: str, version: str, host: str, steps: list[int] | None = (20, 50),  # type: ignore[assignment]
              endpoints: list[str] | None = None, file: str | None = None) -> None:
        spec: dict[str, Any] = {
            "listener": {"address": "127.0.0.1", "port": self.port},
            "hosts": [host],
            "version": version,
            "endpoints": endpoints or [self.backends.address(version if version in ("v1", "v2", "v3") else "v1")],
        }
        if steps:
            spec["strategy"] = {"steps": list(steps), "interval": "1h"}  # nothing advances by itself
        doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": name}, "spec": spec}
        target = self.policies / (file or f"{name}.yaml")
        tmp = self.policies / f".{target.name}.tmp"
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(target)  # the watcher never reads half a file

    def weights(self) -> dict[str, dict[str, int]]:
        return self.envoy.route_weights(self.route)

    def wait_weights(self, expected: dict[str, dict[str, int]], timeout: float = 15.0) -> None:
        wait_until(lambda: self.weights() == expected, timeout, interval=0.05, what=f"Envoy route {expected}")

    def overview(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.plane.cli_json("status")
        return answer

    def status(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.plane.cli_json("status", name)
        return answer

    def rejected(self) -> dict[str, int]:
        """Envoy's non-zero ``*.update_rejected`` counters: what it NACKed."""
        return {k: v for k, v in self.envoy.stats().items() if k.endswith(".update_rejected") and v}

    def no_cluster(self) -> int:
        return sum(v for k, v in self.envoy.stats().items() if k.endswith(".no_cluster"))

    def logged(self, start: str) -> list[str]:
        return [str(e.get("message")) for e in self.plane.log_entries() if str(e.get("message", "")).startswith(start)]


def make_stage(workdir: Path, backends: Backends) -> Stage:
    policies = workdir / "policies"
    policies.mkdir()
    (port,) = free_ports(1)
    return Stage(workdir, backends, policies, AviaryServe(workdir / "aviary", policies, workdir / "state.db"), port)


def start(stage: Stage, envoy_factory: EnvoyFactory, *extra: str) -> None:
    stage.plane.start(*extra)
    stage.envoy = envoy_factory(stage.plane.xds_port, node_id=NODE)
    stage.envoy.wait_ready()
    stage.envoy.wait_for_listener(stage.port)


@pytest.fixture
def stage(workdir: Path, backends: Backends, envoy_factory: EnvoyFactory,
          request: pytest.FixtureRequest) -> Iterator[Stage]:
    backends.start(["v1", "v2", "v3"])
    made = make_stage(workdir, backends)
    try:
        yield made
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {made.plane.describe()}")
        made.plane.stop()


def load(stage: Stage, loadgen_factory: LoadgenFactory, host: str) -> LoadGenerator:
    return loadgen_factory(f"127.0.0.1:{stage.port}", host, clients=2, rate_per_client=40.0)


def canaries_at_20(stage: Stage, envoy_factory: EnvoyFactory, *extra: str) -> None:
    """r20 and r40 on one route, each with its canary v2 at 20 % ACKed by Envoy."""
    stage.write("r20", "v1", "r20.example.com")
    stage.write("r40", "v1", "shop.example.com")
    start(stage, envoy_factory, *extra)
    stage.wait_weights({"r20": {"r20_v1": 100}, "r40": {"r40_v1": 100}})
    stage.write("r20", "v2", "r20.example.com")
    stage.write("r40", "v2", "shop.example.com")
    stage.wait_weights({"r20": {"r20_v1": 80, "r20_v2": 20}, "r40": {"r40_v1": 80, "r40_v2": 20}})
    for name in ("r20", "r40"):
        wait_until(lambda n=name: stage.status(n)["acked_weight"] == 20, 10, what=f"{name}: 20 % ACKed")  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- rename


def test_a_rename_without_prune_is_refused_and_the_other_canaries_keep_moving(
    stage: Stage, envoy_factory: EnvoyFactory, loadgen_factory: LoadgenFactory
) -> None:
    canaries_at_20(stage, envoy_factory)
    shop, r20 = load(stage, loadgen_factory, "shop.example.com"), load(stage, loadgen_factory, "r20.example.com")
    shop.wait_for_requests(50)
    r20.wait_for_requests(50)

    renamed_at = time.monotonic()
    (stage.policies / "r40.yaml").unlink()
    stage.write("r40b", "v2", "shop.example.com")
    refusal = f"host 'shop.example.com' on listener 127.0.0.1:{stage.port} is still served by orphaned rollout r40"
    wait_until(lambda: any(refusal in line for line in stage.logged("policy refused")), 10,
               what="the rename to be refused")
    refused_after = time.monotonic() - renamed_at
    errors = stage.overview()["policy"]["errors"]
    assert [(Path(e["file"]).name, e["field"]) for e in errors] == [("r40b.yaml", "spec.hosts[0]")], errors
    assert "restart with --prune to drop it" in errors[0]["reason"], errors

    stage.plane.cli("set-weight", "r20", "50")  # another canary moves on: Envoy must get it
    stage.wait_weights({"r20": {"r20_v1": 50, "r20_v2": 50}, "r40": {"r40_v1": 80, "r40_v2": 20}})
    wait_until(lambda: stage.status("r20")["acked_weight"] == 50, 10, what="r20: 50 % ACKed")
    r40 = stage.status("r40")
    shop_result, r20_result = shop.stop(), r20.stop()
    rejected = stage.rejected()
    print(
        f"\n[rename] refused {refused_after:.2f}s after the rename; Envoy rejected {rejected}; r40 status "
        f"{r40['phase']} {r40['weight']}% (acked {r40.get('acked_weight')}%, orphaned {r40['orphaned']}), Envoy "
        f"{stage.weights()['r40']}; shop.example.com: {shop_result.total} requests, {shop_result.failed} failed; "
        f"r20.example.com: {r20_result.total} requests, {r20_result.failed} failed"
    )
    assert rejected == {}, rejected
    assert r40["phase"] == "Progressing" and r40["weight"] == 20 and r40["acked_weight"] == 20, r40
    assert r40["orphaned"] and not r40.get("envoy_rejected"), r40
    assert "r40b" not in {r["name"] for r in stage.overview()["rollouts"]}
    assert shop_result.failed == 0 and r20_result.failed == 0, (shop_result.failures, r20_result.failures)
    assert shop_result.by_version.get("v2", 0) > 0  # r40's canary kept its 20 %


def test_a_host_moved_between_files_and_a_rename_with_prune_keep_serving(
    stage: Stage, envoy_factory: EnvoyFactory, loadgen_factory: LoadgenFactory
) -> None:
    stage.write("a", "v1", "a.example.com", steps=None)
    stage.write("b", "v1", "shop.example.com", steps=None)
    start(stage, envoy_factory, "--prune")
    stage.wait_weights({"a": {"a_v1": 100}, "b": {"b_v1": 100}})
    shop = load(stage, loadgen_factory, "shop.example.com")
    shop.wait_for_requests(50)

    # One change: `b` gives shop.example.com to `a` (a sorts first: applied one by one, `a` would
    # have claimed the host while `b` still had it).
    spec_a = yaml.safe_load((stage.policies / "a.yaml").read_text())
    spec_a["spec"]["hosts"] = ["shop.example.com"]
    spec_b = yaml.safe_load((stage.policies / "b.yaml").read_text())
    spec_b["spec"]["hosts"] = ["b.example.com"]
    both = stage.policies / ".both"
    both.mkdir()
    (both / "a.yaml").write_text(yaml.safe_dump(spec_a))
    (both / "b.yaml").write_text(yaml.safe_dump(spec_b))
    (both / "a.yaml").replace(stage.policies / "a.yaml")
    (both / "b.yaml").replace(stage.policies / "b.yaml")
    stage.envoy.wait_for_listener(stage.port)
    wait_until(lambda: stage.envoy.route_weights(stage.route).keys() == {"a", "b"}
               and _domains(stage.envoy, stage.route) == {"a": ["shop.example.com"], "b": ["b.example.com"]},
               15, what="the host to move from b to a")
    moved = shop.snapshot()

    # A rename under --prune, in one change: the old virtual host goes as the new one comes.
    (stage.policies / "a.yaml").unlink()
    stage.write("c", "v2", "shop.example.com", steps=None)
    wait_until(lambda: stage.weights().get("c") == {"c_v2": 100} and "a" not in stage.weights(), 15,
               what="the rename to a -> c")
    wait_until(lambda: "a_v1" not in stage.envoy.cluster_names(), 15, what="a's cluster to go")
    time.sleep(0.5)  # some requests through the new virtual host (not a synchronisation)
    result = shop.stop()
    rejected = stage.rejected()
    print(f"\n[move+rename] Envoy rejected {rejected}; requests {result.total} ({moved.total} before the rename), "
          f"failed {result.failed}, by version {result.by_version}, no_cluster {stage.no_cluster()}")
    assert rejected == {}, rejected
    assert result.failed == 0, (result.failures, result.by_status)
    assert stage.no_cluster() == 0
    assert result.by_version.get("v2", 0) > 0


def _domains(envoy: EnvoyProcess, route: str) -> dict[str, list[str]]:
    for cfg in envoy.config_dump()["configs"]:
        if str(cfg.get("@type", "")).endswith(".RoutesConfigDump"):
            for entry in cfg.get("dynamic_route_configs", []):
                if entry.get("route_config", {}).get("name") == route:
                    return {vh["name"]: vh.get("domains", []) for vh in entry["route_config"].get("virtual_hosts", [])}
    return {}


# --------------------------------------------------------------------------------- cluster names


def test_names_that_used_to_collide_are_valid_and_both_serve(
    stage: Stage, envoy_factory: EnvoyFactory, loadgen_factory: LoadgenFactory
) -> None:
    stage.write("shop", "eu-v1", "shop.example.com", steps=None, endpoints=[stage.backends.address("v1")])
    stage.write("shop-eu", "v1", "eu.example.com", steps=None, endpoints=[stage.backends.address("v2")])
    validate = subprocess.run([str(AVIARY), "validate", str(stage.policies)], capture_output=True, text=True,
                              timeout=30, check=False)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    start(stage, envoy_factory)
    stage.wait_weights({"shop": {"shop_eu-v1": 100}, "shop-eu": {"shop-eu_v1": 100}})
    assert {"shop_eu-v1", "shop-eu_v1"} <= stage.envoy.cluster_names()
    shop, eu = load(stage, loadgen_factory, "shop.example.com"), load(stage, loadgen_factory, "eu.example.com")
    shop.wait_for_requests(40)
    eu.wait_for_requests(40)
    shop_result, eu_result = shop.stop(), eu.stop()
    print(f"\n[collision] validate: {validate.stdout.strip()!r}; shop.example.com {shop_result.by_version}, "
          f"eu.example.com {eu_result.by_version}; Envoy rejected {stage.rejected()}")
    assert shop_result.failed == 0 and eu_result.failed == 0
    assert set(shop_result.by_version) == {"v1"} and set(eu_result.by_version) == {"v2"}  # each its own cluster
    assert stage.rejected() == {}


# ----------------------------------------------------------------------------- NACK, per rollout


def test_a_nack_rolls_back_only_its_own_rollout_and_status_says_envoy_rejected_it(
    stage: Stage, envoy_factory: EnvoyFactory, loadgen_factory: LoadgenFactory
) -> None:
    canaries_at_20(stage, envoy_factory)
    shop, r20 = load(stage, loadgen_factory, "shop.example.com"), load(stage, loadgen_factory, "r20.example.com")
    shop.wait_for_requests(50)
    r20.wait_for_requests(50)

    # 1. r40's canary gets an endpoint Envoy rejects: only r40 rolls back, r20 stays at 20 % at Envoy.
    stage.write("r40", "v2", "shop.example.com", endpoints=[stage.backends.address("v2"), REJECTED_ENDPOINT])
    wait_until(lambda: stage.status("r40")["phase"] == "RolledBack", 15, what="r40 rolled back")
    stage.wait_weights({"r20": {"r20_v1": 80, "r20_v2": 20}, "r40": {"r40_v1": 100}})
    r40, r20_status = stage.status("r40"), stage.status("r20")
    print(f"\n[nack] canary: r40 {r40['phase']} ({r40['reason']!r}); r20 {r20_status['phase']} at "
          f"{r20_status['weight']}% (acked {r20_status.get('acked_weight')}%); Envoy {stage.weights()}")
    assert "malformed IP address" in r40["reason"], r40
    assert r20_status["phase"] == "Progressing" and r20_status["weight"] == 20, r20_status
    assert r20_status["acked_weight"] == 20 and not r20_status.get("envoy_rejected"), r20_status

    # 2. Now r40's stable version gets it: nothing to roll back, Envoy keeps the endpoints it had,
    # and status says so instead of showing the new endpoints as served.
    stage.write("r40", "v1", "shop.example.com", endpoints=[stage.backends.address("v1"), REJECTED_ENDPOINT])
    wait_until(lambda: stage.status("r40").get("envoy_rejected"), 15, what="r40: Envoy rejected ...")
    text = stage.status("r40")["envoy_rejected"]
    print(f"[nack] stable: r40 envoy_rejected={text!r}")
    assert text.startswith(f"Envoy rejected endpoints of cluster r40_v1 (node {NODE}): "), text
    assert "malformed IP address" in text, text
    assert not stage.status("r20").get("envoy_rejected")

    # 3. A good file: Envoy ACKs, the rejection is superseded; a new canary reaches Envoy.
    stage.write("r40", "v1", "shop.example.com")
    wait_until(lambda: not stage.status("r40").get("envoy_rejected"), 10, what="the rejection to clear")
    stage.write("r40", "v3", "shop.example.com")
    stage.wait_weights({"r20": {"r20_v1": 80, "r20_v2": 20}, "r40": {"r40_v1": 80, "r40_v3": 20}})
    shop_result, r20_result = shop.stop(), r20.stop()
    rejected, nacks = stage.rejected(), stage.logged("proxy NACKed")
    print(f"[nack] after v3: r40 {stage.status('r40')['phase']}; NACKs {len(nacks)}; Envoy rejected {rejected}; "
          f"shop failed {shop_result.failed}/{shop_result.total}, r20 failed {r20_result.failed}/{r20_result.total}")
    assert shop_result.failed == 0 and r20_result.failed == 0, (shop_result.failures, r20_result.failures)
    assert len(nacks) == 2, nacks  # each bad update rejected once, never resent


# ------------------------------------------------------------------- upgrade, retiring clusters

OLD_COMMIT = "eeee7e00278cfa80a906e86e183fe1ca5dd9e6c5"  # the last commit naming clusters <rollout>-<version>
REPO = Path(__file__).resolve().parents[2]


def old_aviary(workdir: Path) -> Path:
    """The package as of OLD_COMMIT (from `git archive`, read-only on the repository), or skip."""
    target = workdir / "old"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "xds"], capture_output=True,
                             timeout=60, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT[:12]} is not in this checkout: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=60)
    return target / "xds"


def alive_proxies(state: Path) -> set[str]:
    """The proxies the plane last recorded as served (its heartbeat), read through a read-only connection."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=2.0)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'alive'").fetchone()
    finally:
        db.close()
    return set(json.loads(row[0])["proxies"]) if row else set()


def test_an_upgrade_restart_and_a_restart_while_clusters_retire_fail_no_request(
    stage: Stage, envoy_factory: EnvoyFactory, loadgen_factory: LoadgenFactory, workdir: Path
) -> None:
    old_code = old_aviary(workdir)
    stage.write("shop", "v1", "shop.example.com")
    old = ManagedProcess("aviary-old", stage.plane.args(), stage.plane.workdir,
                         env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(old_code)})
    stage.plane.processes.append(old)
    old.start()

    def listening() -> bool:
        old.ensure_alive()
        return port_open(stage.plane.xds_port, timeout=0.2)

    wait_until(listening, 20, what="the old aviary serve to listen")
    stage.envoy = envoy_factory(stage.plane.xds_port, node_id=NODE)
    stage.envoy.wait_ready()
    stage.envoy.wait_for_listener(stage.port)
    stage.write("shop", "v2", "shop.example.com")
    stage.wait_weights({"shop": {"shop-v1": 80, "shop-v2": 20}})  # the old names
    holder = HoldingProxy(stage.plane.xds_port, hold_until_route_drops="shop-v1", route=stage.route).start()
    try:
        wait_until(lambda: holder.stats().acks.get("RDS", 0) > 0, 10, what="the holding proxy's ACK")
        shop = load(stage, loadgen_factory, "shop.example.com")
        shop.wait_for_requests(50)

        # The upgrade: the new code on the same state. Old-named clusters stay until no proxy routes to them.
        # The old code records proxies once a second only: kill it after it has recorded the holder, or
        # the new one has no reason to wait for it (the new code records a new proxy at once).
        wait_until(lambda: alive_proxies(stage.plane.state) == {NODE, "fake-proxy"}, 10,
                   what="the old plane to record both proxies")
        old.kill9()
        upgraded_at = time.monotonic()
        stage.plane.start("--reconnect-grace", "30")
        stage.wait_weights({"shop": {"shop_v1": 80, "shop_v2": 20}}, timeout=30)
        switched = time.monotonic() - upgraded_at
        wait_until(holder.holding, 10, what="the holding proxy to hold the route without shop-v1")
        assert {"shop-v1", "shop-v2", "shop_v1", "shop_v2"} <= stage.envoy.cluster_names()

        # A restart while shop-v1 and shop-v2 retire: they must stay published.
        wait_until(lambda: alive_proxies(stage.plane.state) == {NODE, "fake-proxy"}, 10,
                   what="the plane to record both proxies")
        stage.plane.current.kill9()
        stage.plane.start("--reconnect-grace", "30")
        wait_until(lambda: stage.plane.proxy_connected(NODE) and stage.plane.proxy_connected("fake-proxy"), 15,
                   what="both proxies back")
        wait_until(lambda: stage.status("shop")["acked_weight"] == 20, 15, what="20 % ACKed again")
        assert {"shop-v1", "shop-v2"} <= stage.envoy.cluster_names()
        assert stage.weights() == {"shop": {"shop_v1": 80, "shop_v2": 20}}
    finally:
        holder.stop()
    wait_until(lambda: "shop-v1" not in stage.envoy.cluster_names(), 15, what="the old names to go")
    result = shop.stop()
    print(f"\n[upgrade] route on the new names {switched:.2f}s after the upgrade restart; Envoy clusters "
          f"{sorted(stage.envoy.cluster_names())}; requests {result.total}, failed {result.failed}, "
          f"by version {result.by_version}; no_cluster {stage.no_cluster()}; rejected {stage.rejected()}")
    assert result.failed == 0, (result.failures, result.by_status)
    assert stage.no_cluster() == 0
    assert stage.envoy.cluster_names() == {"shop_v1", "shop_v2"}
    assert stage.weights() == {"shop": {"shop_v1": 80, "shop_v2": 20}}
    assert result.by_version.get("v2", 0) > 0
