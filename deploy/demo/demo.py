"""`make demo` and `make demo-rollback`: a live canary through a real Envoy, from nothing.

Starts, all on 127.0.0.1: three demo backends (v1, v2, v3, `deploy/demo/backend.py`), Prometheus with
`deploy/prometheus/prometheus.yml`, Envoy with `deploy/envoy/bootstrap.yaml`, and `aviary serve` on a
git repository made in a temporary directory from `policies/demo/`. It sends steady traffic through
Envoy (a quarter of it from "internal" users, header `x-team: qa`; every request names its user in
`x-user-id`), commits the version bump to v2, shows the canary live (the `aviary watch` view) until it
is decided, and prints a summary: time per step, check values, requests sent and failed, mirrored
copies, users who moved back. The policy opens the `internal` cohort first (only their requests
reach v2), then mirrors every other request to v2 (users keep v1's answers), then moves everyone
else 10, 30, 60 % (sticky by user: nobody moves back to v1) and promotes, keeping v1 warm for 10 s
in case v2 fails after all. With `--rollback`, v2 fails about 20 % of its requests and the summary
says how long it took from the first failed request to 0 % at Envoy.

Then (not with `--rollback`) a second scene: v3 answers every request but completes 0.05 orders per
request where v2 completes 0.25. The backends export `orders_completed_total{version="..."}` on their
`/metrics`, Prometheus scrapes it (job `shop`), and the policy's `orders` check compares the canary's
orders per request with stable's (`versionLabel: version`, template `version-rate-per-request`,
`compare: {by: ratio}`): v3 is rolled back while no request failed.

Then a third scene: `aviary record` fetches from Prometheus what the policy's checks queried during
scene 2, and `aviary simulate` replays the policy on it (the engine of `aviary serve` on a simulated
clock, no proxy touched): the same rollback, its time beside the live one, a PNG timeline, and a
sweep over the orders threshold showing which settings would have let v3 through.

A fourth scene: v4 fails 30 % of its requests under a policy whose checks read Envoy's own reports
(`analysis.provider: envoy`: the metrics service sink and the gRPC access log of
`deploy/envoy/bootstrap.yaml`, checked every 500 ms, no Prometheus); the summary says how long it
took from the first failed request to the canary out of Envoy's route.

Ctrl-C stops everything it started. Without a terminal (`CI=true`, or stdout not a tty) it prints
plain progress lines. Exit status: 0 when the canary ended as expected (promoted; rolled back with
`--rollback`), 1 otherwise, 2 when something it needs is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from rich.console import Console
from rich.live import Live

from aviary.admin import render
from aviary.admin.v1 import admin_pb2 as pb
from aviary.admin.v1 import admin_pb2_grpc
from aviary.discovery.resources import cluster_name, route_name
from aviary.policy.schema import ListenerSpec

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
POLICY = REPO / "policies" / "demo" / "shop.yaml"
ROLLOUT = "shop"
HOST = "shop.example.com"
PORTS = {"listener": 10000, "envoy-admin": 9901, "xds": 18000, "admin": 18001, "metrics": 18002,
         "prometheus": 9090, "v1": 8081, "v2": 8082, "v3": 8083, "v4": 8084}  # fmt: skip
REQUESTS_PER_SECOND = 50
ORDERS_PER_REQUEST = {"v1": 0.25, "v2": 0.25, "v3": 0.05, "v4": 0.25}  # the second scene's v3 converts worse
ENVOY_ANALYSIS: dict[str, Any] = {  # scene 4: the checks answered from Envoy's own reports, no Prometheus
    "provider": "envoy", "checkEvery": "500ms", "window": "5s", "minRequests": 10, "inconclusiveLimit": 10,
    "metrics": [{"name": "success", "template": "request-success-rate", "min": 95},
                {"name": "latency", "template": "request-duration-p99", "max": 500}],
}
USERS_PER_CLIENT = 50  # each client thread sends as its own users (x-user-id), none shared


class DemoError(Exception):
    """Something the demo needs is missing or did not start; the message says what to do."""


# ------------------------------------------------------------------------------------ processes


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_ports(free: bool) -> dict[str, int]:
    if free:
        return {name: _free_port() for name in PORTS}
    busy = [f"{name} {port}" for name, port in PORTS.items() if not _port_free(port)]
    if busy:
        raise DemoError(f"ports in use on 127.0.0.1: {', '.join(busy)} (stop what uses them, or pass --free-ports)")
    return dict(PORTS)


def _wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)  # pacing of the poll
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


def _http_get(port: int, path: str, host: str | None = None, timeout: float = 2.0,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={**({"Host": host} if host else {}), **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _last_scrape(port: int) -> float:
    """Unix time of Prometheus' latest scrape (0 while it has none)."""
    try:
        status, body = _http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": "max(timestamp(up))"}))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if result else 0.0
    except (OSError, ValueError, KeyError, IndexError):
        return 0.0


def _answers(port: int, path: str) -> bool:
    try:
        return _http_get(port, path)[0] == 200
    except OSError:
        return False


@dataclass
class Processes:
    """Every process the demo started, stopped (TERM, then KILL) in reverse order."""

    logs: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str | Path]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(  # our own binaries, no shell
            [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops these in order
        )
        self.started.append((name, process))
        return process

    def check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise DemoError(f"{name} exited with status {process.returncode}; see {self.logs / (name + '.log')}")

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in reversed(self.started):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        raise DemoError("prometheus is missing: run 'make demo' (it installs it as root) or 'sudo apt-get install "
                        "prometheus'")
    return found


def envoy_bootstrap(ports: dict[str, int]) -> dict[str, Any]:
    """deploy/envoy/bootstrap.yaml with the demo's admin and xDS ports."""
    bootstrap: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "envoy" / "bootstrap.yaml").read_text())
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = ports["envoy-admin"]
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == "xds_cluster":
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports["xds"]
    return bootstrap


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, scraping the demo's Envoy, Aviary and backends."""
    config: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {"envoy": [f"127.0.0.1:{ports['envoy-admin']}"], "aviary": [f"127.0.0.1:{ports['metrics']}"],
               "shop": [f"127.0.0.1:{ports[v]}" for v in ORDERS_PER_REQUEST]}  # fmt: skip
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


def policy(ports: dict[str, int], version: str) -> dict[str, Any]:
    """policies/demo/shop.yaml at ``version``, on the demo's ports."""
    doc: dict[str, Any] = yaml.safe_load(POLICY.read_text())
    doc["spec"]["listener"]["port"] = ports["listener"]
    doc["spec"]["version"] = version
    doc["spec"]["endpoints"] = [f"127.0.0.1:{ports[version]}"]
    return doc


class PolicyRepository:
    """The git repository `aviary serve` follows: the user's policy repo, in miniature."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self._git("init", "-q", "-b", "main")

    def _git(self, *args: str) -> None:
        env = {**os.environ, "GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
               "GIT_COMMITTER_NAME": "demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}  # fmt: skip
        subprocess.run(["git", *args], cwd=self.path, env=env, check=True, capture_output=True)

    def commit(self, doc: dict[str, Any], message: str) -> None:
        (self.path / "shop.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        self._git("add", "shop.yaml")
        self._git("commit", "-q", "-m", message)


# ------------------------------------------------------------------------------------ traffic


@dataclass
class Traffic:
    """Steady requests through Envoy from a few threads; counts per version and failures."""

    port: int
    sent: int = 0
    failed: int = 0
    by_version: dict[str, int] = field(default_factory=dict)
    first_failure_at: float | None = None
    moved_back: list[float] = field(default_factory=list)  # when a user answered by v2 was next answered by v1
    _last_version: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int = 4) -> Traffic:
        for i in range(clients):
            thread = threading.Thread(target=self._client, args=(i, i == 0), name=f"traffic-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _client(self, number: int, internal: bool) -> None:
        pause = len(self._threads or [None]) / REQUESTS_PER_SECOND
        team = {"x-team": "qa"} if internal else {}  # the policy's `internal` cohort
        sent = 0
        while not self._stop.is_set():
            version, ok = "-", False
            user = f"user-{number}-{sent % USERS_PER_CLIENT}"  # the policy's stickiness key
            sent += 1
            try:
                status, body = _http_get(self.port, "/", HOST, headers={**team, "x-user-id": user})
                ok = status == 200
                version = body.decode(errors="replace").strip() if ok else f"HTTP {status}"
            except OSError as exc:
                version = type(exc).__name__
            with self._lock:
                self.sent += 1
                if ok:
                    self.by_version[version] = self.by_version.get(version, 0) + 1
                    if (self._last_version.get(user), version) == ("v2", "v1"):
                        self.moved_back.append(time.time())
                    self._last_version[user] = version
                else:
                    self.failed += 1
                    self.first_failure_at = self.first_failure_at or time.time()
            self._stop.wait(pause)  # the request rate, not synchronisation

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


@dataclass(frozen=True)
class EnvoyView:
    """The canary as Envoy's own route configuration has it: the weighted default route's share, and
    how many cohort routes (matched ahead of it) send their requests to the canary."""

    weight: int
    cohort_routes: int

    def __str__(self) -> str:
        routes = f" + {self.cohort_routes} cohort route(s)" if self.cohort_routes else ""
        return f"Envoy: canary {self.weight}%{routes}"


def envoy_canary(envoy_admin: int, listener_port: int, canary_version: str = "v2") -> EnvoyView | None:
    """None before Envoy has the route (or while its admin is busy)."""
    try:
        status, body = _http_get(envoy_admin, "/config_dump?resource=dynamic_route_configs")
        configs = json.loads(body).get("configs", []) if status == 200 else []
    except (OSError, ValueError):  # not up yet, or busy
        return None
    route = route_name(ListenerSpec(address="127.0.0.1", port=listener_port))
    canary = cluster_name(ROLLOUT, canary_version)
    for config in configs:
        rc = config.get("route_config", {})
        if rc.get("name") != route:
            continue
        for vhost in rc.get("virtual_hosts", []):
            if vhost.get("name") == ROLLOUT:
                *cohorts, default = [r.get("route", {}) for r in vhost["routes"]]
                weights = {c["name"]: int(c.get("weight", 0)) for c in default.get("weighted_clusters", {})
                           .get("clusters", [])} or {default.get("cluster", ""): 100}  # fmt: skip
                to_canary = sum(1 for action in cohorts if action.get("cluster") == canary)
                return EnvoyView(weights.get(canary, 0), to_canary)
    return None


# ------------------------------------------------------------------------------------ the demo


@dataclass
class Demo:
    ports: dict[str, int]
    rollback: bool
    work: Path
    console: Console
    live: bool
    processes: Processes = field(init=False)
    admin: admin_pb2_grpc.AdminStub = field(init=False)
    envoy_views: list[tuple[float, EnvoyView]] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.work / "logs").mkdir(parents=True)
        self.processes = Processes(self.work / "logs")

    def say(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def start(self) -> PolicyRepository:
        p = self.ports
        self.say(f"[demo] working directory {self.work} (logs in {self.work / 'logs'})")
        self.processes.start("backends", [sys.executable, REPO / "deploy" / "demo" / "backend.py", "--ports-file",
                                          self.work / "backends.json", *(f"{v}={p[v]}" for v in ORDERS_PER_REQUEST)])
        _wait(lambda: (self.work / "backends.json").exists(), 15, "the demo backends")
        for version, orders in ORDERS_PER_REQUEST.items():
            self.behave(version, orders_per_request=orders)
        if self.rollback:
            self.behave("v2", error_rate=0.2)
            self.say("[demo] v2 will fail 20 % of its requests")
        repo = PolicyRepository(self.work / "policies")
        repo.commit(policy(p, "v1"), "shop v1")
        (self.work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(p)))
        self.processes.start("prometheus", [
            _prometheus_binary(), f"--config.file={self.work / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.work / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{p['prometheus']}",
        ])  # fmt: skip
        self.processes.start("aviary", [
            VENV_BIN / "aviary", "serve", "--policies", repo.path, "--git-poll", "1",
            "--state-dir", self.work / "state", "--xds-address", f"127.0.0.1:{p['xds']}",
            "--admin-address", f"127.0.0.1:{p['admin']}", "--metrics-address", f"127.0.0.1:{p['metrics']}",
            "--prometheus-url", f"http://127.0.0.1:{p['prometheus']}",
        ])  # fmt: skip
        (self.work / "envoy.yaml").write_text(yaml.safe_dump(envoy_bootstrap(p)))
        self.processes.start("envoy", [
            VENV_BIN / "envoy", "-c", self.work / "envoy.yaml", "--concurrency", "1", "--disable-hot-restart",
            "-l", "warning",
        ])  # fmt: skip
        _wait(lambda: self._check() and _answers(p["prometheus"], "/-/ready"), 30, "Prometheus")
        _wait(lambda: self._check() and envoy_canary(p["envoy-admin"], p["listener"]) == EnvoyView(0, 0), 30,
              "Envoy to get its routes from Aviary")
        self.admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{p['admin']}"))  # type: ignore[no-untyped-call]
        self.say(f"[demo] Envoy serves shop v1 on http://127.0.0.1:{p['listener']}/ (Host: {HOST}); "
                 f"admin API 127.0.0.1:{p['admin']}, Prometheus http://127.0.0.1:{p['prometheus']}")
        return repo

    def behave(self, version: str, **behaviour: float) -> None:
        """Set a backend's behaviour through its control port (deploy/demo/backend.py)."""
        control = json.loads((self.work / "backends.json").read_text())["control"]
        query = "&".join(f"{key}={value}" for key, value in behaviour.items())
        conn = http.client.HTTPConnection("127.0.0.1", control, timeout=5)
        try:
            conn.request("POST", f"/behaviour?port={self.ports[version]}&{query}")
            if conn.getresponse().status != 200:
                raise DemoError(f"the demo backends refused {query} for {version}")
        finally:
            conn.close()

    def _check(self) -> bool:
        self.processes.check_alive()
        return True

    def rollout(self) -> pb.Rollout:
        rollout: pb.Rollout = self.admin.GetRollout(pb.GetRolloutRequest(name=ROLLOUT), timeout=5)
        return rollout

    def follow(self, traffic: Traffic, timeout: float, canary: str = "v2") -> pb.Rollout:
        """Show the canary until it is decided and Envoy serves the decision."""
        deadline = time.monotonic() + timeout
        recent: deque[pb.RolloutEvent] = deque(maxlen=8)
        seen_events = 0
        last_line = ""
        view = Live(console=self.console, auto_refresh=False) if self.live else contextlib.nullcontext()
        with view as live:
            while time.monotonic() < deadline:
                self.processes.check_alive()
                rollout = self.rollout()
                envoy = envoy_canary(self.ports["envoy-admin"], self.ports["listener"], canary)
                if envoy is not None and (not self.envoy_views or self.envoy_views[-1][1] != envoy):
                    self.envoy_views.append((time.time(), envoy))
                events = list(rollout.events)
                recent.extend(events[seen_events:] if seen_events <= len(events) else events)
                seen_events = len(events)
                if isinstance(live, Live):
                    live.update(render.watch_view({ROLLOUT: rollout}, recent), refresh=True)
                else:
                    line = f"[demo] {render.rollout_line(rollout)}; {envoy}"
                    if line != last_line:
                        self.say(f"{line}; requests {traffic.sent}, failed {traffic.failed}")
                        last_line = line
                promoted = rollout.phase == "Stable" and rollout.stable_version == canary and envoy == EnvoyView(100, 0)
                if promoted or (rollout.phase == "RolledBack" and envoy == EnvoyView(0, 0)):
                    return rollout
                time.sleep(0.25)  # refresh rate of the view
        raise DemoError(f"the canary was not decided within {timeout:.0f}s: {render.rollout_line(self.rollout())}")

    def summary(self, rollout: pb.Rollout, traffic: Traffic, bumped_at: float) -> list[str]:
        lines = [f"[demo] result: {render.rollout_line(rollout)}"]
        events = [e for e in rollout.events if e.time.ToNanoseconds() / 1e9 >= bumped_at]
        times = [e.time.ToNanoseconds() / 1e9 for e in events]
        steps: list[tuple[str, float, float]] = []  # what, entered, left (a step logs twice: set, then ACKed)
        for event, at, ends in zip(events, times, [*times[1:], None], strict=True):
            if event.to_phase != "Progressing" or ends is None:
                continue
            cohorts = f" and cohorts {', '.join(event.cohorts)}" if event.cohorts else ""
            mirror = f" and mirror {event.mirror}%" if event.mirror else ""
            what = f"canary at {event.weight:3d}%{cohorts}{mirror}"
            if steps and steps[-1][0] == what:
                steps[-1] = (what, steps[-1][1], ends)
            else:
                steps.append((what, at, ends))
        for what, entered, left in steps:
            lines.append(f"[demo]   {what}: {left - entered:5.1f} s")
        guarding = [at for e, at in zip(events, times, strict=True) if e.to_phase == "Guarding"]
        if guarding and rollout.phase == "Stable" and times:
            lines.append(f"[demo]   v2 promoted; v1 kept warm in Envoy for {times[-1] - guarding[0]:.1f} s "
                         "(afterPromotion), then retired")
        if times:
            lines.append(f"[demo]   {rollout.phase} {times[-1] - bumped_at:.1f} s after the v2 commit")
        judged = next((e.checks for e in reversed(events) if e.checks), rollout.checks)
        for check in judged:
            value = f"{check.value:.4g}" if check.HasField("value") else "-"
            lines.append(f"[demo]   check {check.name}: {check.outcome} (value {value}) {check.reason}".rstrip())
        versions = ", ".join(f"{v} {n}" for v, n in sorted(traffic.by_version.items()))
        lines.append(f"[demo] requests sent {traffic.sent}, failed {traffic.failed} ({versions}); a quarter of them "
                     "with x-team: qa, the `internal` cohort")
        copies = self.mirrored_copies(traffic)
        if copies is not None:
            lines.append(f"[demo] mirrored copies answered by v2: {copies} (users got v1's answers to them)")
        decided = next((at for e, at in zip(events, times, strict=True) if e.to_phase == "RolledBack"), None)
        back = sum(1 for at in traffic.moved_back if decided is None or at < decided)
        lines.append(f"[demo] users moved back from v2 to v1 while the canary ran: {back} "
                     f"(sticky by x-user-id, {4 * USERS_PER_CLIENT} users)")
        if self.rollback and traffic.first_failure_at is not None:
            gone = EnvoyView(0, 0)
            zero = next((at for at, v in self.envoy_views if v == gone and at >= traffic.first_failure_at), None)
            if zero is not None:
                lines.append(f"[demo] first failed request -> canary out of Envoy's route (0 %, no cohort route): "
                             f"{zero - traffic.first_failure_at:.2f} s")
        return lines

    def mirrored_copies(self, traffic: Traffic) -> int | None:
        """What v2 answered beyond the requests whose answers users got: the mirror step's copies."""
        try:
            control = json.loads((self.work / "backends.json").read_text())["control"]
            status, body = _http_get(control, "/counts")
            counts = json.loads(body) if status == 200 else {}
        except (OSError, ValueError, KeyError):
            return None
        served = int(counts.get(str(self.ports["v2"]), 0))
        return max(0, served - traffic.by_version.get("v2", 0) - traffic.failed)

    def run(self) -> int:
        repo = self.start()
        traffic = Traffic(self.ports["listener"]).start()
        try:
            _wait(lambda: traffic.by_version.get("v1", 0) >= 50, 20, "traffic to flow through Envoy")
            bumped_at = time.time()
            repo.commit(policy(self.ports, "v2"), "shop v2")
            self.say("[demo] committed shop v2 to the policy repository: the canary starts")
            rollout = self.follow(traffic, timeout=120)
            time.sleep(1.0)  # a last second of traffic on the decided route, for the counts
        finally:
            traffic.stop()
        for line in self.summary(rollout, traffic, bumped_at):
            self.say(line)
        expected = "RolledBack" if self.rollback else "Stable"
        if rollout.phase != expected:
            self.say(f"[demo] expected {expected}, got {rollout.phase}")
            return 1
        return 0 if self.rollback else self.orders_scene(repo)

    def orders_scene(self, repo: PolicyRepository) -> int:
        """v3 answers every request but converts worse: the orders check against stable rolls it back."""
        self.say(f"[demo] scene 2: v3 completes {ORDERS_PER_REQUEST['v3']} orders per request, v2 "
                 f"{ORDERS_PER_REQUEST['v2']}; every answer is a 200. The backends export "
                 'orders_completed_total{version="..."} and the policy compares orders per request with stable')
        self.envoy_views = []
        traffic = Traffic(self.ports["listener"]).start()
        try:
            bumped_at = time.time()
            repo.commit(policy(self.ports, "v3"), "shop v3")
            self.say("[demo] committed shop v3 to the policy repository: the canary starts")
            rollout = self.follow(traffic, timeout=60, canary="v3")
        finally:
            traffic.stop()
        self.say(f"[demo] result: {render.rollout_line(rollout)}")
        decided = [(e, e.time.ToNanoseconds() / 1e9) for e in rollout.events if e.to_phase == "RolledBack"]
        for event, at in [(e, at) for e, at in decided if at >= bumped_at][:1]:
            self.say(f"[demo]   {event.to_phase} {at - bumped_at:.1f} s after the v3 commit")
            for check in event.checks:
                value = f"{check.value:.4g}" if check.HasField("value") else "-"
                self.say(f"[demo]   check {check.name}: {check.outcome} (value {value}) {check.reason}".rstrip())
        self.say(f"[demo] requests sent {traffic.sent}, failed {traffic.failed}: only the orders check saw v3's fault")
        if rollout.phase != "RolledBack":
            self.say(f"[demo] expected v3 RolledBack, got {rollout.phase}")
            return 1
        return self.simulate_scene(rollout, bumped_at) or self.envoy_scene(repo)

    def simulate_scene(self, rollout: pb.Rollout, bumped_at: float) -> int:
        """Scene 3: record scene 2 from Prometheus and replay it with `aviary simulate`, then sweep."""
        stamped = [(e, e.time.ToNanoseconds() / 1e9) for e in rollout.events]
        events = [(e, at) for e, at in stamped if at >= bumped_at]
        arrived = next(at for e, at in events if e.reason.startswith("new version v3"))
        decided = next(at for e, at in events if e.to_phase == "RolledBack")
        self.say("[demo] scene 3: aviary record fetches what the policy's checks queried during scene 2, and "
                 "aviary simulate replays the policy on it with the engine of aviary serve, no proxy touched")
        prometheus = f"http://127.0.0.1:{self.ports['prometheus']}"
        _wait(lambda: _last_scrape(self.ports["prometheus"]) > decided + 2, 15, "a scrape after the rollback")
        policy_file = self.work / "shop-v3.yaml"
        policy_file.write_text(yaml.safe_dump(policy(self.ports, "v3"), sort_keys=False))
        recording = self.work / "scene-2.json.gz"
        self._aviary("record", "--prometheus", prometheus, "--policy", policy_file, "--from", f"{arrived - 1:.3f}",
                     "--to", f"{decided + 2:.3f}", "--stable", "v2", "-o", recording)
        plot = Path(tempfile.gettempdir()) / "aviary-demo-simulate.png"
        done = self._aviary("simulate", policy_file, "--metrics", recording, "--start", f"{arrived:.3f}",
                            "--plot", plot, expect=(3,))
        outcome = done.stdout.strip().splitlines()[-1]
        self.say(f"[demo]   simulated: {outcome}; live: rolled back after {decided - arrived:.1f}s")
        self.say(f"[demo]   timeline: {plot}")
        self.say("[demo]   the same recording with other orders thresholds (aviary simulate --sweep):")
        sweep = self._aviary("simulate", policy_file, "--metrics", recording, "--start", f"{arrived:.3f}",
                             "--sweep", "analysis.metrics.2.compare.min=0.1,0.5,0.9", expect=(0,))
        for line in sweep.stdout.strip().splitlines():
            self.say(f"[demo]     {line}")
        return 0

    def envoy_scene(self, repo: PolicyRepository) -> int:
        """Scene 4: v4 fails 30 % of its requests; the checks read Envoy's own reports, not Prometheus."""
        self.say("[demo] scene 4: v4 fails 30 % of its requests, and the policy reads Envoy's own reports "
                 "(analysis.provider: envoy): Envoy streams its stats every second and each request's "
                 "status and duration to Aviary, which checks every 500 ms; Prometheus is not asked")
        self.behave("v4", error_rate=0.3)
        self.envoy_views = []
        doc = policy(self.ports, "v4")
        doc["spec"]["analysis"] = ENVOY_ANALYSIS
        traffic = Traffic(self.ports["listener"]).start()
        try:
            repo.commit(doc, "shop v4, checked from Envoy's reports")
            self.say("[demo] committed shop v4 to the policy repository: the canary starts")
            # The rollout is still RolledBack (v3) until the commit is pulled: wait for v4 first.
            _wait(lambda: "v4" in (self.rollout().canary_version, self.rollout().failed_version), 30,
                  "the v4 canary to start")
            rollout = self.follow(traffic, timeout=60, canary="v4")
        finally:
            traffic.stop()
        self.say(f"[demo] result: {render.rollout_line(rollout)}")
        gone = EnvoyView(0, 0)
        failed_at = traffic.first_failure_at
        zero = next((at for at, view in self.envoy_views if view == gone and failed_at and at >= failed_at), None)
        if failed_at is not None and zero is not None:
            self.say(f"[demo]   first failed request -> canary out of Envoy's route, from Envoy's reports: "
                     f"{zero - failed_at:.2f} s (stats flushed every 1 s; make bench times both providers)")
        if rollout.phase != "RolledBack":
            self.say(f"[demo] expected v4 RolledBack, got {rollout.phase}")
            return 1
        return 0

    def _aviary(self, *args: str | Path, expect: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([VENV_BIN / "aviary", *map(str, args)], capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode not in expect:
            raise DemoError(f"aviary {args[0]} exited {done.returncode}: {done.stderr.strip() or done.stdout[-500:]}")
        return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rollback", action="store_true", help="v2 fails ~20%% of requests: watch it roll back")
    parser.add_argument("--free-ports", action="store_true",
                        help="pick free ports instead of the documented ones "
                             "(10000, 9901, 18000-18002, 9090, 8081-8084)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, state) afterwards")
    args = parser.parse_args(argv)
    live = sys.stdout.isatty() and not os.environ.get("CI")
    console = Console(highlight=False) if live else Console(highlight=False, width=1000, force_terminal=False)
    work = Path(tempfile.mkdtemp(prefix="aviary-demo-"))
    demo: Demo | None = None
    try:
        demo = Demo(choose_ports(args.free_ports), args.rollback, work, console, live)
        return demo.run()
    except DemoError as exc:
        print(f"make demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[demo] interrupted: stopping everything it started", file=sys.stderr)
        return 130
    finally:
        if demo is not None:
            demo.processes.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
