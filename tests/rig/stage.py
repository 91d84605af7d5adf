"""What the e2e modules that drive rollouts through one real Envoy share.

- ``running_rig``: a control plane, an Envoy and a Prometheus scraping Envoy's admin (and the
  backends' ``/metrics``, if given) every second, for a whole module; all three stopped on the way
  out, even after a failure.
- ``start_plane_and_envoy``: backends v1/v2, a control plane and an Envoy for one test, from its
  fixtures.
- ``Listener``: one listener of that Envoy (its route, the RDS updates of its route); ``Stage``:
  one rollout alone on it: its policy file (written atomically), its status, what Envoy routes for
  it, and admin commands (resume, abort timed to Envoy).
- ``RouteWatch``: Envoy's weights for one route polled in a thread, every change kept with its time.
- ``in_background``: work in a thread for the duration of a block (load beside a load generator).
- ``fetch``: requests over one keep-alive connection, counted by the version that answered.
- ``write_results``: a module's figures as ``tests/e2e/.results/<name>.json``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from aviary.app import ControlPlane
from aviary.discovery.resources import route_name
from aviary.policy.rollout_state import Abort, AdminCommand, Phase, Resume, RolloutStatus, TransitionEvent
from aviary.policy.schema import ListenerSpec
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane, write_policy
from tests.rig.envoy import EnvoyProcess
from tests.rig.ports import port_open
from tests.rig.prometheus import PrometheusProcess
from tests.rig.waiting import wait_until

RESULTS_DIR = Path(__file__).resolve().parents[1] / "e2e" / ".results"
HOST = "app.example.com"


def write_results(name: str, results: Mapping[str, Any]) -> Path:
    """``results`` as ``tests/e2e/.results/<name>.json`` (sorted keys, indented)."""
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


# ------------------------------------------------------------------- plane + Envoy + Prometheus


@dataclass
class Rig:
    plane: RunningControlPlane
    envoy: EnvoyProcess
    prometheus: PrometheusProcess
    policies: Path


RigT = TypeVar("RigT", bound=Rig)


@contextlib.contextmanager
def running_rig(base: Path, rig_type: type[RigT], app_targets: list[str] | None = None) -> Iterator[RigT]:
    """An in-process control plane watching ``base/policies``, an Envoy fed by it and a Prometheus
    scraping that Envoy (and ``/metrics`` of each of ``app_targets``) every second, every target
    up; all stopped on the way out."""
    policies = base / "policies"
    policies.mkdir()
    plane = RunningControlPlane(policies, poll_interval=0.2)
    envoy: EnvoyProcess | None = None
    prometheus: PrometheusProcess | None = None
    try:
        plane.start()
        envoy = EnvoyProcess(base / "envoy", plane.xds_port).start()
        prometheus = PrometheusProcess(base / "prometheus", [f"127.0.0.1:{envoy.admin_port}"], "1s",
                                       app_targets=app_targets).start()
        prometheus.wait_for_target_up(timeout=30)
        yield rig_type(plane, envoy, prometheus, policies)
    finally:
        for stop in (prometheus.stop if prometheus else None, envoy.stop if envoy else None, plane.stop):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()


# ------------------------------------------------------------- a plane and an Envoy per test


def start_plane_and_envoy(
    workdir: Path,
    backends: Backends,
    control_plane_factory: Callable[..., RunningControlPlane],
    envoy_factory: Callable[..., EnvoyProcess],
    hook: Callable[[ControlPlane], object] | None = None,
    delta: bool = False,
) -> tuple[RunningControlPlane, EnvoyProcess, Path]:
    """Backends v1 and v2, a control plane watching ``workdir/policies`` (``hook`` run on it before
    it serves) and an Envoy fed by it (incremental ADS if ``delta``), from the test's factories
    (which stop them at teardown)."""
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    plane = control_plane_factory(policies, start=False).start(hook=hook)
    return plane, envoy_factory(plane.xds_port, delta=delta), policies


# ---------------------------------------------------------------- a listener, one rollout on it


@dataclass
class Listener:
    """Listener ``port`` on 127.0.0.1 of a running plane and Envoy: its policy files go to
    ``policies``, its endpoints come from ``backends``."""

    plane: RunningControlPlane
    envoy: EnvoyProcess
    backends: Backends
    policies: Path
    port: int

    @property
    def route(self) -> str:
        return route_name(ListenerSpec(address="127.0.0.1", port=self.port))

    def rds_updates(self) -> int:
        """Route configurations Envoy accepted for this listener's route so far."""
        return sum(v for k, v in self.envoy.stats().items() if k.endswith(f"rds.{self.route}.update_success"))


@dataclass
class Stage(Listener):
    """One rollout, ``name``, alone on the listener (hosts ``*``)."""

    name: str = field(default="shop", kw_only=True)
    figures: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def cluster(self, version: str) -> str:
        return f"{self.name}_{version}"

    def write(self, version: str, strategy: dict[str, Any] | None = None,
              analysis: dict[str, Any] | None = None) -> None:
        """``<name>.yaml`` with ``version`` (its one endpoint from ``backends``), written atomically."""
        write_policy(self.policies, self.name, port=self.port, version=version,
                     endpoints=[self.backends.address(version)], strategy=strategy, analysis=analysis)

    def serve_v1(self, timeout: float = 15) -> None:
        """Write v1 without strategy; wait until Envoy routes everything to it and listens."""
        self.write("v1")
        wait_until(lambda: self.weights() == {self.cluster("v1"): 100} and port_open(self.port), timeout,
                   what=f"Envoy to route {self.name} to v1")

    def status(self) -> RolloutStatus:
        status = self.plane.call(lambda p: p.runner.status(self.name))
        assert status is not None, f"rollout {self.name} unknown to the control plane"
        return status

    def history(self) -> list[TransitionEvent]:
        return self.plane.call(lambda p: p.runner.history(self.name))

    def story(self) -> str:
        """The rollout's transitions, one per line, for assertion messages."""
        return "\n".join(f"  {e.at:.2f} {e}" for e in self.history()) or "  (no transitions)"

    def command(self, action: AdminCommand) -> RolloutStatus:
        """An admin command (Resume, Abort, ...), as the admin API sends it to the runner."""
        status: RolloutStatus = self.plane.call(lambda p: p.runner.command(self.name, action))
        return status

    def resume(self) -> RolloutStatus:
        return self.command(Resume())

    def abort(self, rolled_back_at_envoy: Callable[[], bool]) -> tuple[RolloutStatus, float]:
        """Abort (the command must answer RolledBack), then wait until ``rolled_back_at_envoy()``
        holds (polled every 10 ms, 10 s at most): the status and the seconds from the command."""
        aborted_at = time.monotonic()
        status = self.command(Abort())
        assert status.phase is Phase.ROLLED_BACK, status
        wait_until(rolled_back_at_envoy, 10, interval=0.01, what="the rollback at Envoy")
        return status, time.monotonic() - aborted_at

    def weights(self) -> dict[str, int]:
        """{cluster: weight} of the rollout's weighted default route at Envoy."""
        return self.envoy.route_weights(self.route).get(self.name, {})

    def routes(self) -> list[dict[str, Any]]:
        """The rollout's routes as Envoy dumps them (weighted default last)."""
        return self.envoy.virtual_host_routes(self.route).get(self.name, [])


# -------------------------------------------------------------------------- watching a route


class RouteWatch:
    """Polls Envoy's route ``route`` in a thread; keeps (epoch seconds, {cluster: weight}) at every
    change, the weights of all its virtual hosts merged. A poll that fails (admin busy, Envoy going
    away) is skipped."""

    def __init__(self, envoy: EnvoyProcess, route: str, interval: float = 0.02) -> None:
        self.envoy, self.route, self.interval = envoy, route, interval
        self.changes: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"route-{route}", daemon=True)

    def _run(self) -> None:
        last: dict[str, int] | None = None
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # admin busy: try again
                weights: dict[str, int] = {}
                for by_cluster in self.envoy.route_weights(self.route).values():
                    weights.update(by_cluster)
                if weights != last:
                    self.changes.append((time.time(), weights))
                    last = weights
            self._stop.wait(self.interval)  # pacing of the poll, not synchronisation

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def first_after(self, since: float, weights: dict[str, int]) -> float | None:
        return next((at for at, seen in self.changes if at >= since and seen == weights), None)

    def describe(self) -> str:
        return "\n".join(f"  {at:.3f} {weights}" for at, weights in self.changes)


# ---------------------------------------------------------------------------------- requests


@contextlib.contextmanager
def in_background(work: Callable[[threading.Event], None], name: str) -> Iterator[None]:
    """``work(stop)`` in a daemon thread for the duration of the block; on the way out ``stop`` is
    set and the thread joined (10 s at most). ``work`` returns once ``stop`` is set."""
    stop = threading.Event()
    worker = threading.Thread(target=work, args=(stop,), name=name, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(10)


def fetch(port: int, n: int, headers: Mapping[str, str] | None = None, host: str = HOST) -> dict[str, int]:
    """``n`` GETs with ``headers`` over one keep-alive connection: counts by answering version (the
    body of a 200), and "failed" (another status or a transport error)."""
    counts: dict[str, int] = {"failed": 0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for _ in range(n):
            try:
                conn.request("GET", "/", headers={"Host": host, **(headers or {})})
                resp = conn.getresponse()
                body = resp.read().decode()
                key = body if resp.status == 200 else "failed"
                counts[key] = counts.get(key, 0) + 1
                if resp.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                counts["failed"] += 1
                conn.close()
    finally:
        conn.close()
    return counts
