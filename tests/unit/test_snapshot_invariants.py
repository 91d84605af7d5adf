"""Nothing Envoy must reject is ever published, whatever the policy files do (no sockets).

Policy sets go through the same path as in `aviary serve`: the loader's `PolicyBook` (cross-file
rules), `RolloutRunner.apply_policies` (orphans, --prune, one batch per set), the director
(make-before-break, `resources.render` before every publish). After every step each published
snapshot is checked by `resources.violations`, which reads the route configurations back from
their bytes. A sample of snapshots, turned into a static Envoy bootstrap, is checked by
`envoy --mode validate` itself; a control with a duplicate domain shows Envoy rejects what the
checker refuses.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import TypeVar

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aviary.admin.convert import WallClock, rollout_message
from aviary.admin.render import envoy_lag, rollout_line
from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_events import ProxyConnected, ResourcesAcked, ResourcesNacked, SubscriptionChanged
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import PublishedRollout, build_snapshot, render, route_name, violations
from aviary.discovery.snapshot import Snapshot
from aviary.policy.loader import LoadResult, PolicyBook, parse_policy_text
from aviary.policy.rollout_state import Phase, RolloutStatus
from aviary.policy.schema import Endpoint, ListenerSpec, PolicyError, PolicySet, Rollout
from aviary.runner import RolloutRunner
from aviary.store.sqlite import StateStore
from aviary.traffic import Backend
from tests.rig.envoy import envoy_binary

# ---- policy sets ------------------------------------------------------------------------------

NAMES = ["a", "a-b", "b", "shop", "shop-eu", "r40", "r40b"]
VERSIONS = ["v1", "v2", "eu-v1", "1.0", "b-1"]
HOSTS = ["*", "*.example.com", "x.example.com", "X.Example.com", "y.example.com", "shop.example.com"]
ENDPOINTS = ["127.0.0.1:9001", "10.0.0.2:9002", "[::1]:9003", "backend.internal:8080", "localhost:9004"]


def policy_text(name: str, version: str, hosts: list[str], port: int, endpoints: list[str],
                steps: bool) -> str:
    doc = {
        "apiVersion": "aviary.dev/v1",
        "kind": "Rollout",
        "metadata": {"name": name},
        "spec": {
            "listener": {"address": "127.0.0.1", "port": port},
            "hosts": hosts,
            "version": version,
            "endpoints": endpoints,
            **({"strategy": {"steps": [20, 50], "interval": "1h"}} if steps else {}),
        },
    }
    return json.dumps(doc)  # JSON is YAML


@st.composite
def policy_files(draw: st.DrawFn) -> dict[str, Rollout]:
    """File name -> rollout; files may repeat names or hosts (the loader sorts that out)."""
    files: dict[str, Rollout] = {}
    for index in range(draw(st.integers(0, 5))):
        text = policy_text(
            draw(st.sampled_from(NAMES)),
            draw(st.sampled_from(VERSIONS)),
            draw(st.lists(st.sampled_from(HOSTS), min_size=1, max_size=2, unique_by=str.casefold)),
            draw(st.sampled_from([10000, 10001])),
            draw(st.lists(st.sampled_from(ENDPOINTS), min_size=1, max_size=2, unique=True)),
            draw(st.booleans()),
        )
        rollout, errors = parse_policy_text(text, f"p{index}.yaml")
        assert rollout is not None, errors
        files[f"p{index}.yaml"] = rollout
    return files


def load(book: PolicyBook, files: dict[str, Rollout]) -> PolicySet:
    policy_set, _ = book.apply(LoadResult({}, [], {f: f for f in files}, dict(files)))
    return policy_set


def assert_publishable(cache: SnapshotCache) -> None:
    for group, snapshot in cache.snapshots.items():
        assert violations(snapshot) == [], (group, violations(snapshot))
        assert snapshot.inconsistencies() == []


class Plane:
    """A runner, its director and cache, with an optional Envoy-like proxy that ACKs on demand."""

    def __init__(self, prune: bool = False, store: StateStore | None = None) -> None:
        self.cache, self.proxies = SnapshotCache(), ProxyStatus()
        self.director = TrafficDirector(self.cache, self.proxies)
        self.runner = RolloutRunner(self.director, clock=lambda: 1000.0, store=store, prune=prune)

    def connect(self) -> None:
        self.proxies.apply(ProxyConnected(1, "envoy-1", "edge", "peer", 0.0))
        for type_url in (typeurls.CLUSTER, typeurls.LISTENER):
            self.proxies.apply(SubscriptionChanged(1, type_url, True, frozenset()))
        self.ack_all()

    def ack(self, type_url: str) -> None:
        snapshot = self.cache.snapshot_for("edge")
        if type_url in (typeurls.ENDPOINT, typeurls.ROUTE):
            lower = typeurls.CLUSTER if type_url == typeurls.ENDPOINT else typeurls.LISTENER
            names = frozenset(n for r in snapshot.items(lower).values() for n in r.references)
            self.proxies.apply(SubscriptionChanged(1, type_url, False, names))
        proxy = self.proxies.get(1)
        assert proxy is not None
        sub = proxy.subscription(type_url)
        chosen = snapshot.select(type_url, sub.names, sub.wildcard)
        self.proxies.apply(ResourcesAcked(1, type_url, "v", {n: r.version for n, r in chosen.items()}, 0.0, 0.0))

    def ack_all(self) -> None:
        for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE):
            self.ack(type_url)

    def apply(self, files: dict[str, Rollout]) -> list[PolicyError]:
        refused = self.runner.apply_policies(
            PolicySet(rollouts={r.name: r for r in files.values()}, files={r.name: f for f, r in files.items()})
        )
        self.drain()
        return refused

    def drain(self) -> None:
        """Hand the queued director callbacks (ACKs, NACKs) to the engine, as the loop would."""
        inbox = self.runner._inbox
        while not inbox.empty():
            name, event = inbox.get_nowait()
            self.runner.handle(name, event)

    def route_domains(self, port: int = 10000) -> dict[str, list[str]]:
        resource = self.cache.snapshot_for("edge").items(typeurls.ROUTE).get(f"route-127.0.0.1-{port}")
        if resource is None:
            return {}
        config = _unpack(resource.any_bytes, route_pb2.RouteConfiguration())
        return {vh.name: list(vh.domains) for vh in config.virtual_hosts}


M = TypeVar("M", bound=Message)


def _unpack(any_bytes: bytes, message: M) -> M:
    assert any_pb2.Any.FromString(any_bytes).Unpack(message)
    return message


def rollout(name: str, host: str, version: str = "v1", steps: bool = True, hosts: list[str] | None = None) -> Rollout:
    text = policy_text(name, version, hosts or [host], 10000, ["127.0.0.1:9001"], steps)
    parsed, errors = parse_policy_text(text, "x")
    assert parsed is not None, errors
    return parsed


# ---- the faults, one by one -------------------------------------------------------------------


def test_a_rename_without_prune_is_refused_and_everything_else_keeps_moving() -> None:
    plane = Plane()
    plane.connect()
    files = {"r40.yaml": rollout("r40", "shop.example.com"), "r20.yaml": rollout("r20", "r20.example.com")}
    plane.apply(files)
    files = {"r40.yaml": rollout("r40", "shop.example.com", "v2"), "r20.yaml": rollout("r20", "r20.example.com", "v2")}
    plane.apply(files)
    plane.ack_all()
    assert plane.director.published_route("r40") == {"v1": 80, "v2": 20}

    refused = plane.apply({"r40b.yaml": rollout("r40b", "shop.example.com", "v2"), "r20.yaml": files["r20.yaml"]})
    assert [(e.file, e.field) for e in refused] == [("r40b.yaml", "spec.hosts[0]")]
    assert "still served by orphaned rollout r40" in refused[0].reason
    assert plane.runner.refusals() == refused
    assert plane.runner.orphaned("r40") and plane.runner.rollout("r40b") is None
    assert plane.route_domains() == {"r20": ["r20.example.com"], "r40": ["shop.example.com"]}
    assert_publishable(plane.cache)

    plane.director.set_canary_weight("r20", 50)  # another rollout's step: it still reaches Envoy
    plane.ack_all()
    plane.drain()
    assert plane.director.published_route("r20") == {"v1": 50, "v2": 50}
    assert plane.director.acked("r20") is not None and plane.director.acked("r20").canary_weight == 50  # type: ignore[union-attr]


def test_a_rename_with_prune_in_one_commit_moves_the_host() -> None:
    plane = Plane(prune=True)
    plane.connect()
    plane.apply({"r40.yaml": rollout("r40", "shop.example.com")})
    plane.ack_all()
    assert plane.apply({"r40b.yaml": rollout("r40b", "shop.example.com")}) == []
    assert plane.route_domains() == {"r40": ["shop.example.com"]}  # served by r40 until r40b's clusters are warm
    assert set(plane.cache.snapshot_for("edge").items(typeurls.CLUSTER)) == {"r40_v1", "r40b_v1"}
    plane.ack(typeurls.CLUSTER)
    plane.ack(typeurls.ENDPOINT)
    assert plane.route_domains() == {"r40b": ["shop.example.com"]}  # handed over in one route update
    assert plane.director.blocked("r40b") is None
    assert "r40_v1" in plane.cache.snapshot_for("edge").items(typeurls.CLUSTER)  # until the route is ACKed
    plane.ack(typeurls.ROUTE)
    assert set(plane.cache.snapshot_for("edge").items(typeurls.CLUSTER)) == {"r40b_v1"}


def test_a_host_moved_between_files_in_one_commit_keeps_working() -> None:
    plane = Plane()
    plane.apply({"a.yaml": rollout("a", "shop.example.com"), "b.yaml": rollout("b", "b.example.com")})
    generation = plane.cache.generation
    book = PolicyBook()
    load(book, {"a.yaml": rollout("a", "shop.example.com"), "b.yaml": rollout("b", "b.example.com")})
    moved = load(book, {"a.yaml": rollout("a", "a.example.com"), "b.yaml": rollout("b", "shop.example.com")})
    assert plane.runner.apply_policies(moved) == []
    assert plane.route_domains() == {"a": ["a.example.com"], "b": ["shop.example.com"]}
    assert plane.cache.generation == generation + 1
    assert plane.director.blocked("a") is None and plane.director.blocked("b") is None


def test_a_nack_of_the_rollback_itself_does_not_loop() -> None:
    plane = Plane()
    plane.connect()
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com")})
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com", "v2")})
    plane.ack_all()
    plane.drain()
    assert plane.runner.status("shop").weight == 20  # type: ignore[union-attr]
    route = route_name(ListenerSpec(address="127.0.0.1", port=10000))
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com", "v2", hosts=["shop.example.com", "s.example.com"])})
    for _ in range(3):  # Envoy rejects the new host, then the rollback's own route (it still has it), ...
        version = plane.cache.snapshot_for("edge").items(typeurls.ROUTE)[route].version
        plane.proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "x", {route: version}, "no", 0.0))
        plane.drain()
    status = plane.runner.status("shop")
    assert status is not None and status.phase is Phase.ROLLED_BACK
    assert sum(1 for e in plane.runner.history("shop") if e.to_phase is Phase.ROLLED_BACK) == 1
    assert plane.runner.blocked("shop") == f"Envoy rejected route {route} (node envoy-1): no"
    assert plane.director.envoy_weights("shop") == {"v1": 80, "v2": 20}  # what Envoy still serves
    plane.ack(typeurls.ROUTE)
    assert plane.runner.blocked("shop") is None
    assert plane.director.envoy_weights("shop") == {"v1": 100}


def test_a_restart_keeps_a_retiring_cluster_a_proxy_still_routes_to(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    plane = Plane(store=store)
    plane.connect()
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com", steps=False)})
    plane.ack_all()
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com", "v2", steps=False)})
    plane.ack(typeurls.CLUSTER)
    plane.ack(typeurls.ENDPOINT)  # the route moves to v2; Envoy has not ACKed it
    assert plane.director.published_route("shop") == {"v2": 100}
    assert "shop_v1" in plane.cache.snapshot_for("edge").items(typeurls.CLUSTER)
    saved = store.load()
    store.close()

    store = StateStore(tmp_path / "state.db")
    again = Plane(store=store)
    again.director.expect_proxies({"envoy-1"}, grace=60)
    again.runner.restore(saved)
    clusters = again.cache.snapshot_for("edge").items(typeurls.CLUSTER)
    assert set(clusters) == {"shop_v1", "shop_v2"}  # v1 retiring: kept until a route without it is ACKed
    store.close()


def test_state_from_before_injective_names_restores_the_old_clusters_first(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    plane = Plane(store=store)
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com")})
    plane.apply({"shop.yaml": rollout("shop", "shop.example.com", "v2")})
    store.close()
    db = sqlite3.connect(path)  # as schema 2 left it: no published table
    db.execute("DROP TABLE published")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()

    store = StateStore(path)
    again = Plane(store=store)
    again.director.expect_proxies({"envoy-1"}, grace=60)
    again.runner.restore(store.load())
    snapshot = again.cache.snapshot_for("edge")
    assert set(snapshot.items(typeurls.CLUSTER)) == {"shop-v1", "shop-v2", "shop_v1", "shop_v2"}
    assert snapshot.items(typeurls.ROUTE)["route-127.0.0.1-10000"].references == {"shop-v1", "shop-v2"}
    again.connect()  # Envoy is back: new names first, then the route, then the old names go
    again.ack_all()
    again.ack_all()
    assert set(again.cache.snapshot_for("edge").items(typeurls.CLUSTER)) == {"shop_v1", "shop_v2"}
    store.close()


def on_listener(port: int, name: str, hosts: list[str], version: str = "v1") -> Rollout:
    moved = rollout(name, hosts[0], version, steps=False, hosts=hosts)
    listener = ListenerSpec(address="127.0.0.1", port=port)
    return moved.model_copy(update={"spec": moved.spec.model_copy(update={"listener": listener})})


def test_a_rollout_moving_onto_a_host_of_one_being_pruned_while_a_newcomer_warms_up() -> None:
    """Found by the property test below: `a` is pruned while `a-b` (new) takes one of its hosts and
    `b` moves from another listener onto the other. `a` kept both hosts while `a-b` warmed up, so
    `*` was in the route twice and the safety net held `b` back (never published to Envoy)."""
    plane, book = Plane(prune=True), PolicyBook()
    plane.connect()
    steps = [
        {"p0.yaml": on_listener(10001, "b", ["*"], "v2"), "p1.yaml": on_listener(10000, "a", ["*", "*.example.com"])},
        {"p0.yaml": on_listener(10000, "b", ["*"]), "p1.yaml": on_listener(10000, "a-b", ["*.example.com"])},
    ]
    for files in steps:
        plane.runner.apply_policies(load(book, files))
        plane.drain()
        assert_publishable(plane.cache)
        for _ in range(2):
            plane.ack_all()
            plane.drain()
            assert_publishable(plane.cache)
    assert plane.director.blocked("b") is None and plane.director.blocked("a-b") is None
    assert plane.route_domains(10000) == {"a-b": ["*.example.com"], "b": ["*"]}


# ---- property: random policy sets never publish what Envoy rejects ------------------------------


SAMPLES: list[Snapshot] = []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(policy_files(), min_size=1, max_size=4), prune=st.booleans(), proxy=st.booleans())
def test_random_policy_sets_are_refused_or_publishable(
    steps: list[dict[str, Rollout]], prune: bool, proxy: bool
) -> None:
    plane, book = Plane(prune=prune), PolicyBook()
    if proxy:
        plane.connect()
    for files in steps:
        policy_set = load(book, files)
        refused = plane.runner.apply_policies(policy_set)
        plane.drain()
        assert_publishable(plane.cache)
        for _ in range(2 if proxy else 0):  # a host taken over waits for its new clusters' ACK
            plane.ack_all()
            plane.drain()
            assert_publishable(plane.cache)
        refused_files = {e.file for e in refused}
        served = {vh for port in (10000, 10001) for vh in plane.route_domains(port)}
        for name, file in policy_set.files.items():
            # the loader and the runner refuse every conflict first: the director's check is a net
            assert plane.director.blocked(name) is None, plane.director.blocked(name)
            if file not in refused_files:
                assert name in served, (name, served)
    snapshot = plane.cache.snapshot_for("edge")
    if len(SAMPLES) < 5 and snapshot.items(typeurls.ROUTE):
        SAMPLES.append(snapshot)


def bootstrap(snapshot: Snapshot) -> dict[str, object]:
    """The snapshot as static resources: routes inlined into their listeners, EDS clusters STATIC."""
    static = bootstrap_pb2.Bootstrap.StaticResources()
    routes = {
        name: _unpack(resource.any_bytes, route_pb2.RouteConfiguration())
        for name, resource in snapshot.items(typeurls.ROUTE).items()
    }
    for resource in snapshot.items(typeurls.LISTENER).values():
        if not resource.wildcard:
            continue  # api_listeners are for proxyless gRPC clients
        listener = _unpack(resource.any_bytes, listener_pb2.Listener())
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                hcm = _unpack(network_filter.typed_config.SerializeToString(), hcm_pb2.HttpConnectionManager())
                hcm.route_config.CopyFrom(routes[hcm.rds.route_config_name])
                network_filter.typed_config.Pack(hcm)
        static.listeners.append(listener)
    for name, resource in snapshot.items(typeurls.CLUSTER).items():
        cluster = _unpack(resource.any_bytes, cluster_pb2.Cluster())
        if cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS:
            assignment = snapshot.items(typeurls.ENDPOINT)[name]
            cluster.ClearField("eds_cluster_config")
            cluster.type = cluster_pb2.Cluster.DiscoveryType.STATIC
            cluster.load_assignment.CopyFrom(_unpack(assignment.any_bytes, endpoint_pb2.ClusterLoadAssignment()))
        static.clusters.append(cluster)
    return {"node": {"id": "validate", "cluster": "edge"}, "static_resources": MessageToDict(static)}


def envoy_validate(config: dict[str, object], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.timeout(120)
def test_a_sample_passes_envoy_validate(tmp_path: Path) -> None:
    if not SAMPLES:
        pytest.skip("run with test_random_policy_sets_are_refused_or_publishable first (same module)")
    for index, snapshot in enumerate(SAMPLES):
        result = envoy_validate(bootstrap(snapshot), tmp_path / f"sample{index}.json")
        assert result.returncode == 0, (result.stdout, result.stderr)


def test_envoy_rejects_what_the_checker_refuses(tmp_path: Path) -> None:
    listener = ListenerSpec(address="127.0.0.1", port=10000)
    v1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
    twice = [PublishedRollout.of(name, listener, ("shop.example.com",), ((v1, 100),), (v1,)) for name in ("a", "b")]
    assert render(twice).snapshot is None
    result = envoy_validate(bootstrap(build_snapshot(twice)), tmp_path / "twice.json")
    assert result.returncode != 0
    assert "Only unique values for domains are permitted" in result.stdout + result.stderr


# ---- status follows Envoy ---------------------------------------------------------------------


def test_status_shows_a_rollback_envoy_has_not_acked_yet_and_what_envoy_rejected() -> None:
    v1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
    status = RolloutStatus("shop", Phase.ROLLED_BACK, v1, failed_version="v2", reason="rolled back v2: ...")
    clock = WallClock(0.0, 0.0)
    waiting = rollout_message(status, None, [], clock, envoy_weights={"v1": 80, "v2": 20},
                              envoy_rejected="Envoy rejected route route-0.0.0.0-10000 (node n1): bad")
    assert waiting.acked_weight == 20
    assert envoy_lag(waiting) == "rolling back: weight 0 % desired, Envoy still at 20 % on v2 (waiting for ACK)"
    line = rollout_line(waiting)
    assert "Envoy still at 20 %" in line and "Envoy rejected route route-0.0.0.0-10000 (node n1): bad" in line
    done = rollout_message(status, None, [], clock, envoy_weights={"v1": 100})
    assert done.acked_weight == 0 and envoy_lag(done) == "" and not done.envoy_rejected
    canary = RolloutStatus("shop", Phase.PROGRESSING, v1, Backend("v2", v1.endpoints), weight=50, acked_weight=20)
    assert envoy_lag(rollout_message(canary, None, [], clock)) == (
        "weight 50 % desired, Envoy still at 20 % (waiting for ACK)")
