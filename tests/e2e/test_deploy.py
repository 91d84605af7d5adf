"""deploy/ and the Dockerfile against the real envoy binary and a real `aviary serve`.

Static checks (references, ports, schemas) are in tests/unit/test_deploy.py. Here: every bootstrap
that deploy/ ships passes `envoy --mode validate`; the compose and Kubernetes bootstraps, run for real
with the control plane's DNS name pointed at localhost, find `aviary serve` through STRICT_DNS and
serve traffic; the image's HEALTHCHECK command answers from a live admin port; and an Envoy asking
for delta xDS (the rig's bootstrap-delta.yaml) is served.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import _FAILED, EnvoyFactory
from tests.rig import deploy_files as d
from tests.rig.backends import Backends
from tests.rig.control_plane import write_policy
from tests.rig.envoy import BOOTSTRAP_DELTA, EnvoyProcess, envoy_binary
from tests.rig.ports import free_port, free_ports
from tests.rig.serve_process import AviaryServe
from tests.rig.simple_http import http_request
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

def _kubernetes_envoy() -> tuple[dict[str, Any], list[str]]:
    """The edge Envoy's bootstrap and the flags its Deployment adds (pod name filled in)."""
    objects = d.render_kustomization()
    (container,) = d.by_kind(objects, "Deployment")["envoy-edge"]["spec"]["template"]["spec"]["containers"]
    flags = d.envoy_flags([a.replace("$(POD_NAME)", "envoy-edge-7d9f-abcde") for a in container["args"]])
    flags.pop("--config-path")  # the mounted ConfigMap: the test passes its own copy
    return yaml.safe_load(d.envoy_bootstrap_text(objects)), [word for item in flags.items() for word in item]


def _compose_envoy() -> tuple[dict[str, Any], list[str]]:
    flags = d.envoy_flags(d.compose()["services"]["envoy"]["command"])
    flags.pop("-c")
    return yaml.safe_load((d.COMPOSE_DIR / "envoy.yaml").read_text()), [word for item in flags.items() for word in item]


def _local_envoy() -> tuple[dict[str, Any], list[str]]:
    return yaml.safe_load((d.REPO_ROOT / "deploy" / "envoy" / "bootstrap.yaml").read_text()), []


SHIPPED = {
    "deploy/envoy/bootstrap.yaml": _local_envoy,
    "deploy/compose/envoy.yaml": _compose_envoy,
    "deploy/kubernetes/envoy-bootstrap.yaml": _kubernetes_envoy,
}


def _validate(bootstrap: dict[str, Any], flags: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_bootstrap_passes_envoy_validate(name: str, tmp_path: Path) -> None:
    bootstrap, flags = SHIPPED[name]()
    done = _validate(bootstrap, flags, tmp_path / "bootstrap.yaml")
    assert done.returncode == 0, f"{name}: envoy --mode validate {flags}:\n{done.stdout}{done.stderr}"
    # The check is real: the same file with one unknown field is refused.
    bootstrap["static_resources"]["clusters"][0]["connect_timeout_typo"] = "1s"
    assert _validate(bootstrap, flags, tmp_path / "broken.yaml").returncode != 0


def test_every_bootstrap_file_in_deploy_is_checked() -> None:
    shipped = {
        str(p.relative_to(d.REPO_ROOT))
        for p in (d.REPO_ROOT / "deploy").rglob("*.y*ml")
        if "static_resources" in p.read_text()
    }
    assert shipped == set(SHIPPED), "add the new bootstrap to SHIPPED"


# ---- the compose and Kubernetes bootstraps, live -------------------------------------------------


@pytest.fixture
def serve(workdir: Path, request: pytest.FixtureRequest) -> Iterator[AviaryServe]:
    """`aviary serve` (not started) on a policy directory in workdir; stopped at teardown."""
    policies = workdir / "policies"
    policies.mkdir()
    plane = AviaryServe(workdir / "aviary", policies, workdir / "state.db")
    try:
        yield plane
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {plane.describe()}")
        plane.stop()


class _ShippedEnvoy(EnvoyProcess):
    """An Envoy on one of deploy/'s bootstraps, with only addresses and ports made local: the
    control plane's DNS name becomes "localhost" (still STRICT_DNS, resolved by Envoy)."""

    def __init__(self, workdir: Path, bootstrap: dict[str, Any], flags: list[str], xds_port: int) -> None:
        super().__init__(workdir, xds_port)
        self.ops_port = free_port()
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = self.admin_port
        (xds,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
        sock = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        sock["address"], sock["port_value"] = "localhost", xds_port
        for cluster in bootstrap["static_resources"]["clusters"]:
            if cluster["name"] == "envoy_admin":
                admin = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                admin["socket_address"]["port_value"] = self.admin_port
        (ops,) = bootstrap["static_resources"]["listeners"]
        ops["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": self.ops_port}
        self.bootstrap = bootstrap
        logging = ("-l", "--log-level")  # the rig sets its own
        self.process.args.extend(w for k, v in d.envoy_flags(flags).items() if k not in logging for w in (k, v))

    def start(self, timeout: float = 15.0) -> _ShippedEnvoy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap_path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        self.process.start()
        self.wait_admin(timeout)
        return self


@pytest.mark.parametrize("name", ["deploy/compose/envoy.yaml", "deploy/kubernetes/envoy-bootstrap.yaml"])
def test_shipped_edge_bootstrap_finds_aviary_by_dns_name_and_serves(
    name: str, serve: AviaryServe, backends: Backends, workdir: Path
) -> None:
    bootstrap, flags = SHIPPED[name]()
    kind, _, _ = d.xds_cluster_address(bootstrap)
    assert kind == "STRICT_DNS"
    ports = backends.start(["v1"])
    listener = free_port()
    write_policy(serve.policies, "shop", port=listener, version="v1", endpoints=[f"127.0.0.1:{ports['v1']}"])
    serve.start()
    envoy = _ShippedEnvoy(workdir / "envoy", bootstrap, flags, serve.xds_port)
    try:
        envoy.start()
        # What the kubelet's readiness probe and Prometheus ask, on the ops listener.
        wait_until(
            lambda: http_request(envoy.ops_port, "/ready", timeout=1.0).body.strip() == "LIVE",
            20.0, what=f"{name}: /ready on the ops listener says LIVE",
        )  # fmt: skip
        wait_until(lambda: http_request(listener, "/", timeout=2.0).body == "v1", 10.0, what="v1 through Envoy")
        stats = http_request(envoy.ops_port, "/stats/prometheus")
        assert stats.status == 200 and "envoy_cluster_upstream_rq" in stats.body
        assert http_request(envoy.ops_port, "/config_dump").status == 404, "only /ready and stats are exposed"
        node = d.envoy_flags(flags).get("--service-node", bootstrap["node"]["id"])
        wait_until(lambda: serve.proxy_connected(node), 10.0, what=f"aviary sees node {node}")
    except BaseException:
        print(envoy.describe())
        raise
    finally:
        envoy.stop()


# ---- the image's HEALTHCHECK ---------------------------------------------------------------------


def _healthcheck(admin_port: int) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command, run with this venv's python against ``admin_port``."""
    stage = d.final_stage(d.dockerfile_instructions())
    command = d.exec_form(d.only(stage, "HEALTHCHECK").text.partition("CMD ")[2])
    image_admin = d.port_of(d.parse_aviary(d.image_command()).admin_address)
    assert command[0] == "python"
    argv = [sys.executable, *(a.replace(f":{image_admin}'", f":{admin_port}'") for a in command[1:])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_image_healthcheck_passes_on_a_live_admin_port_without_the_token(serve: AviaryServe, workdir: Path) -> None:
    token = workdir / "admin-token"
    token.write_text("s3cret-token-for-the-test\n")
    serve.start("--admin-token-file", str(token))
    wait_until(lambda: _healthcheck(serve.admin_port).returncode == 0, 10.0, what="HEALTHCHECK exits 0")
    serve.stop()
    done = _healthcheck(serve.admin_port)
    assert done.returncode != 0, "nothing listens: the health check must fail"
    (idle,) = free_ports(1)
    assert _healthcheck(idle).returncode != 0


# ---- delta xDS: an Envoy with api_type DELTA_GRPC is served by `aviary serve` ------------------------


def test_a_delta_envoy_is_served_by_aviary_serve(
    serve: AviaryServe, backends: Backends, envoy_factory: EnvoyFactory
) -> None:
    assert BOOTSTRAP_DELTA.parent == Path(d.REPO_ROOT / "tests" / "rig"), "a test asset, not shipped in deploy/"
    backends.start(["v1"])
    port = free_port()
    write_policy(serve.policies, "shop", port=port, version="v1", endpoints=[backends.address("v1")])
    serve.start()
    envoy = envoy_factory(serve.xds_port, delta=True)
    envoy.wait_ready()
    envoy.wait_for_listener(port)
    wait_until(lambda: http_request(port, "/", timeout=2.0).body == "v1", 10.0, what="v1 through the delta Envoy")
    assert not [e for e in serve.log_entries() if str(e.get("message", "")).startswith("unimplemented RPC")]
