"""What deploy/ and the Dockerfile ship, checked without Docker, kubectl or a cluster.

Each check is one a user would otherwise find by a failed `docker build`, `docker compose up` or
`kubectl apply -k`: a COPY of a missing file, a flag `aviary serve` does not accept, a port that the
Service, the probe and the process disagree on, a Secret or ConfigMap nobody creates. Checks that run
the envoy binary (`envoy --mode validate`, a live Envoy on each bootstrap) are in tests/e2e/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from aviary.admin.auth import read_token
from aviary.admin.server import is_loopback
from aviary.cli import build_parser
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.server import ADS_SERVICE, AggregatedDiscoveryService, start_xds_server
from aviary.policy.loader import load_directory, validate_paths
from aviary.policy.schema import PolicyError, PolicySet
from aviary.policy.watcher import DirectoryWatcher
from tests.rig import deploy_files as d
from tests.rig.containers import ContainerProcess, Runtime, choose_runtime, in_runtime
from tests.rig.envoy import EnvoyProcess
from tests.rig.process import ManagedProcess
from tests.rig.prometheus import PrometheusProcess
from tests.rig.waiting import async_wait_until

SERVE_DEFAULTS = build_parser().parse_args(["serve", "--policies", "."])
DEFAULT_PORTS = {
    "xds": d.port_of(SERVE_DEFAULTS.xds_address),
    "admin": d.port_of(SERVE_DEFAULTS.admin_address),
    "metrics": d.port_of(SERVE_DEFAULTS.metrics_address),
}
KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships


# ---- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    sources = d.copy_sources(d.dockerfile_instructions())
    assert sources, "the image must be built from this repository (COPY pyproject.toml, xds/ ...)"
    ignored = d.dockerignore_patterns()
    for source in sources:
        assert (d.REPO_ROOT / source).exists(), f"Dockerfile: COPY {source}: no such file in the repository"
        hits = [p for p in ignored if fnmatch.fnmatch(source.rstrip("/"), p.rstrip("/"))]
        assert not hits, f"Dockerfile: COPY {source} is excluded by .dockerignore {hits}"
    # pyproject.toml names README.md as the readme: the build fails without it.
    assert {"pyproject.toml", "README.md", "xds"} <= {s.rstrip("/") for s in sources}


def test_what_the_dockerfile_copies_builds_the_package_with_its_cli(tmp_path: Path) -> None:
    """`pip install .` in the image sees only the COPY sources minus .dockerignore: build a wheel
    from exactly that (offline: no dependencies, this venv's setuptools) and look inside."""
    context = tmp_path / "context"
    ignored = d.dockerignore_patterns()

    def skip(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(d.REPO_ROOT)
        return {n for n in names if any(fnmatch.fnmatch(str(relative / n), p) for p in ignored)} | {
            n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc"))
        }

    for source in d.copy_sources(d.dockerfile_instructions()):
        origin = d.REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=skip)
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(origin, context / source)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("aviary-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"aviary/cli.py", "aviary/py.typed", "aviary/admin/v1/admin_pb2.py"} <= names
    assert "aviary = aviary.cli:main" in entry_points, "the image's ENTRYPOINT runs the `aviary` script"


def test_dockerignore_keeps_the_venv_git_and_secrets_out_of_the_context() -> None:
    ignored = d.dockerignore_patterns()
    for path in (".venv", ".git", "tests", "deploy/kubernetes/admin-token", "xds/aviary.egg-info"):
        assert any(fnmatch.fnmatch(path, p) for p in ignored), f".dockerignore should exclude {path}"


def test_image_installs_this_repository_not_the_pypi_name() -> None:
    runs = " ".join(ins.text for ins in d.dockerfile_instructions() if ins.keyword == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the image installs the checkout: pip install ."
    assert not re.search(r"pip install (--\S+ )*aviary\b", runs), "`aviary` on PyPI is an unrelated project"


def test_no_deploy_file_or_readme_tells_users_to_pip_install_aviary() -> None:
    texts = [d.DOCKERFILE, d.REPO_ROOT / "README.md", *sorted((d.REPO_ROOT / "deploy").rglob("*.y*ml"))]
    for path in texts:
        assert not re.search(r"pip install (-\S+ )*aviary\b", path.read_text()), (
            f"{path}: `pip install aviary` installs an unrelated PyPI project; use `pip install .` or the image"
        )


def test_image_runs_as_a_numeric_non_root_user() -> None:
    stage = d.final_stage(d.dockerfile_instructions())
    user = d.only(stage, "USER").text
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: numeric, so that Kubernetes can check runAsNonRoot"
    assert int(uid) != 0, f"USER {user} is root"
    assert stage[0].text.split()[0] == "python:3.11-slim"


def test_entrypoint_is_aviary_serve_with_flags_the_cli_accepts() -> None:
    args = d.parse_aviary(d.image_command())
    assert args.command == "serve"
    for role, address in (("xds", args.xds_address), ("admin", args.admin_address), ("metrics", args.metrics_address)):
        assert d.host_of(address) == "0.0.0.0", f"{role} must listen on every interface in a container"
        assert d.port_of(address) == DEFAULT_PORTS[role], f"{role}: keep the CLI's default port {DEFAULT_PORTS[role]}"
    assert not is_loopback(args.admin_address)
    assert args.admin_token_file, "off loopback `aviary serve` refuses to start without --admin-token-file"
    env = dict(
        word.split("=", 1)
        for ins in d.final_stage(d.dockerfile_instructions())
        if ins.keyword == "ENV"
        for word in shlex.split(ins.text)
    )
    assert env["AVIARY_TOKEN_FILE"] == args.admin_token_file, "the CLI in the container finds the server's token"


def test_exposed_ports_and_healthcheck_match_the_entrypoint() -> None:
    stage = d.final_stage(d.dockerfile_instructions())
    args = d.parse_aviary(d.image_command())
    exposed = {int(p.split("/")[0]) for p in d.only(stage, "EXPOSE").text.split()}
    assert exposed == {d.port_of(a) for a in (args.xds_address, args.admin_address, args.metrics_address)}
    healthcheck = d.only(stage, "HEALTHCHECK").text
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    probe = d.exec_form(command)
    assert f"127.0.0.1:{d.port_of(args.admin_address)}" in " ".join(probe), "the health check asks the admin port"
    assert "grpc_health" in " ".join(probe), "gRPC health service: answers without the admin token"


# ---- Compose ------------------------------------------------------------------------------------


def _serve_args(service: dict[str, Any]) -> Any:
    """A compose service running the image's entrypoint with its `command:` added."""
    assert "entrypoint" not in service
    return d.parse_aviary(d.image_entrypoint() + list(service.get("command", [])))


def test_compose_file_references_only_what_exists() -> None:
    doc = d.compose()
    services: dict[str, Any] = doc["services"]
    volumes = set(doc.get("volumes", {}))
    for name, service in services.items():
        if "build" in service:
            context = (d.COMPOSE_DIR / service["build"]["context"]).resolve()
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
        for target, source in d.bind_mounts(service).items():
            if isinstance(source, Path):
                assert source.exists(), f"compose service {name}: mount {source} -> {target}: no such file"
            else:
                assert source in volumes, f"compose service {name}: volume {source} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"compose service {name} depends on unknown {dependency}"
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in services, name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"compose service {name} publishes {port} beyond loopback"


def test_compose_aviary_serves_the_mounted_policies_with_a_generated_token() -> None:
    services = d.compose()["services"]
    aviary = services["aviary"]
    args = _serve_args(aviary)
    mounts = d.bind_mounts(aviary)
    policies = mounts[args.policies]
    assert isinstance(policies, Path) and policies.is_dir()
    assert validate_paths([policies]) == [], "the compose policies must pass `aviary validate`"
    # The token file lives on the state volume that the admin-token service writes first.
    token_dir = str(Path(args.admin_token_file).parent)
    assert mounts[token_dir] == d.bind_mounts(services["admin-token"])[token_dir]
    assert args.admin_token_file in services["admin-token"]["command"][0]
    assert aviary["depends_on"]["admin-token"]["condition"] == "service_completed_successfully"
    assert aviary["environment"]["AVIARY_TOKEN_FILE"] == args.admin_token_file
    # Prometheus by its service name, on the port the prometheus service serves.
    url = urlsplit(args.prometheus_url)
    assert url.hostname in services and url.port == 9090
    published = {str(p).rsplit(":", 1)[1] for p in aviary["ports"]}
    assert {str(d.port_of(a)) for a in (args.xds_address, args.admin_address, args.metrics_address)} == published


def test_compose_token_generator_makes_a_private_token_once(tmp_path: Path) -> None:
    services = d.compose()["services"]
    token_file = _serve_args(services["aviary"]).admin_token_file
    script = services["admin-token"]["command"][0].replace(token_file, str(tmp_path / "admin-token"))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    first = (tmp_path / "admin-token").read_text()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)  # `docker compose up` again
    assert (tmp_path / "admin-token").read_text() == first, "a restart must keep the token the CLI holds"
    token = read_token(tmp_path / "admin-token")  # what `aviary serve --admin-token-file` accepts
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "admin-token").st_mode) == 0o600


def test_compose_envoy_prometheus_and_backends_agree_on_names_and_ports() -> None:
    services = d.compose()["services"]
    serve = _serve_args(services["aviary"])
    envoy = services["envoy"]
    command = envoy["command"]
    bootstrap_path = command[command.index("-c") + 1]
    bootstrap_file = d.bind_mounts(envoy)[bootstrap_path]
    assert isinstance(bootstrap_file, Path)
    bootstrap = yaml.safe_load(bootstrap_file.read_text())
    kind, address, port = d.xds_cluster_address(bootstrap)
    assert (kind, address, port) == ("STRICT_DNS", "aviary", d.port_of(serve.xds_address))
    assert bootstrap["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    ops_port, ops_paths = d.ops_routes(bootstrap)
    assert ops_paths == {"/ready", "/stats/prometheus"}, "the ops listener exposes nothing else of the admin API"
    assert is_loopback(f"{bootstrap['admin']['address']['socket_address']['address']}:0")

    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_file = d.bind_mounts(prometheus)[config_arg.split("=", 1)[1]]
    assert isinstance(config_file, Path)
    jobs = {job["job_name"]: job for job in yaml.safe_load(config_file.read_text())["scrape_configs"]}
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{ops_port}"]
    assert jobs["envoy"]["metrics_path"] in ops_paths
    assert jobs["aviary"]["static_configs"][0]["targets"] == [f"aviary:{d.port_of(serve.metrics_address)}"]

    # The policy's listener is published by the envoy service; its endpoints are the backends'
    # ports in Envoy's network namespace (the backends share it).
    policies = d.bind_mounts(services["aviary"])[serve.policies]
    assert isinstance(policies, Path)
    result = load_directory(policies)
    assert not result.errors
    backends = services["backends"]
    assert backends["network_mode"] == "service:envoy"
    versions = dict(spec.split("=") for spec in backends["command"] if "=" in spec and spec[0] != "-")
    script = d.bind_mounts(backends)[backends["command"][1]]
    assert isinstance(script, Path) and script.is_file()
    published = {int(str(p).rsplit(":", 1)[1]) for p in envoy["ports"]}
    assert ops_port in published
    for rollout, _ in result.rollouts.values():
        spec = rollout.spec
        assert spec.listener.port in published
        for endpoint in spec.endpoints:
            host, port_text = str(endpoint).rsplit(":", 1)
            assert host == "127.0.0.1" and versions[spec.version] == port_text, endpoint


# ---- Kubernetes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return d.render_kustomization()


def test_every_kubernetes_object_passes_the_schema(objects: list[dict[str, Any]]) -> None:
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "ConfigMap"}
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_old_single_file_and_delta_bootstrap_are_gone() -> None:
    assert not (d.KUBERNETES_DIR / "aviary.yaml").exists()
    assert not (d.REPO_ROOT / "deploy" / "envoy" / "bootstrap-delta.yaml").exists()
    for path in (d.REPO_ROOT / "deploy").rglob("*.y*ml"):
        assert "api_type: DELTA_GRPC" not in path.read_text(), (
            f"{path}: the shipped bootstraps use State-of-the-World (api_type: GRPC); delta is tested in tests/rig"
        )


def test_every_reference_in_a_deployment_exists(objects: list[dict[str, Any]]) -> None:
    secrets = d.by_kind(objects, "Secret")
    config_maps = d.by_kind(objects, "ConfigMap")
    claims = d.by_kind(objects, "PersistentVolumeClaim")
    accounts = d.by_kind(objects, "ServiceAccount")
    for name, deployment in d.by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
            "labels"
        ].items(), name
        if "serviceAccountName" in pod:
            assert pod["serviceAccountName"] in accounts, f"{name}: ServiceAccount {pod['serviceAccountName']}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{name}: Secret {volume['secret']['secretName']}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: ConfigMap {volume['configMap']['name']}"
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{name}: PersistentVolumeClaim {claim}"
        for container in d.pod_containers(deployment):
            where = f"{name}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']} has no volume"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, where
            ports = {p["containerPort"] for p in container.get("ports", [])}
            names = {p["name"] for p in container.get("ports", [])}
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_kind)
                if probe is None:
                    continue
                (handler,) = [probe[k] for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe]
                if "port" in handler:
                    port = handler["port"]
                    assert port in ports or port in names, f"{where}: {probe_kind} port {port} is not a container port"
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: pin the image ({image})"


def test_services_select_pods_and_target_their_ports(objects: list[dict[str, Any]]) -> None:
    deployments = d.by_kind(objects, "Deployment").values()
    for name, service in d.by_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        (target,) = [
            dep for dep in deployments if selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {p["name"]: p["containerPort"] for c in d.pod_containers(target) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target_port = port["targetPort"]
            assert target_port in ports or target_port in ports.values(), f"Service {name}: targetPort {target_port}"


def _aviary(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    deployment = d.by_kind(objects, "Deployment")["aviary"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "aviary"]
    assert "command" not in container, "keep the image's entrypoint (aviary serve and its defaults)"
    return deployment, container, d.parse_aviary(d.image_entrypoint() + container["args"])


def test_aviary_deployment_runs_one_replica_with_probes_on_the_admin_port(objects: list[dict[str, Any]]) -> None:
    deployment, container, args = _aviary(objects)
    assert deployment["spec"]["replicas"] == 1, "one instance per state file (it is locked)"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "never two engines during a rollout"
    admin_port = d.port_of(args.admin_address)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": admin_port}, f"{probe}: gRPC health on the admin port"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "xds": d.port_of(args.xds_address),
        "admin": admin_port,
        "metrics": d.port_of(args.metrics_address),
    }
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert container["image"] == "aviary-control-plane:dev"


def test_aviary_reads_its_token_state_and_policies_from_the_mounted_volumes(objects: list[dict[str, Any]]) -> None:
    deployment, container, args = _aviary(objects)
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    def volume_of(path: str) -> tuple[str, dict[str, Any]]:
        (mount_path,) = [m for m in mounts if path.startswith(m.rstrip("/") + "/")]
        return path[len(mount_path) + 1 :], volumes[mounts[mount_path]]

    key, token_volume = volume_of(args.admin_token_file)
    secret = d.by_kind(objects, "Secret")[token_volume["secret"]["secretName"]]
    assert key in secret["data"], f"--admin-token-file names key {key}, the Secret holds {sorted(secret['data'])}"
    _, state_volume = volume_of(args.state)
    assert "persistentVolumeClaim" in state_volume, "rollout state must survive a restart"
    assert str(Path(args.state).parent) == args.state_dir

    # Policies: a folder in git-sync's published checkout, on the volume git-sync writes.
    relative, policy_volume = volume_of(args.policies)
    assert "emptyDir" in policy_volume
    repository = d.by_kind(objects, "ConfigMap")["aviary-policy-repository"]["data"]
    assert relative.split("/")[0] == repository["GITSYNC_LINK"]
    assert len(relative.split("/")) >= 2, "not the checkout root: it holds a .git file, taken for a repository"
    sync_containers = [c for c in d.pod_containers(deployment) if c["image"].startswith("registry.k8s.io/git-sync/")]
    assert {c["name"] for c in sync_containers} == {"git-sync-init", "git-sync"}
    policy_volume_name = mounts[args.policies.removesuffix("/" + relative)]
    for sync in sync_containers:
        assert re.fullmatch(r"registry\.k8s\.io/git-sync/git-sync:v4\.\d+\.\d+", sync["image"])
        (root,) = [m["mountPath"] for m in sync["volumeMounts"] if m["name"] == policy_volume_name]
        assert root == repository["GITSYNC_ROOT"], f"{sync['name']} writes where aviary reads"
    assert [c["args"] for c in pod["initContainers"]] == [["--one-time"]], "first checkout before aviary starts"


def test_edge_envoy_finds_the_control_plane_by_the_service_dns_name(objects: list[dict[str, Any]]) -> None:
    _, _, args = _aviary(objects)
    namespace = d.kustomization()["namespace"]
    bootstrap = yaml.safe_load(d.envoy_bootstrap_text(objects))
    kind, address, port = d.xds_cluster_address(bootstrap)
    (service,) = [
        s for s in d.by_kind(objects, "Service").values() if any(p["targetPort"] == "xds" for p in s["spec"]["ports"])
    ]
    (xds_port,) = [p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "xds"]
    assert kind == "STRICT_DNS"
    assert address == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert port == xds_port == d.port_of(args.xds_address)
    assert bootstrap["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert is_loopback(f"{bootstrap['admin']['address']['socket_address']['address']}:0")

    envoy = d.by_kind(objects, "Deployment")["envoy-edge"]
    (container,) = envoy["spec"]["template"]["spec"]["containers"]
    flags = d.envoy_flags(container["args"])
    config_path = flags["--config-path"]
    (mount,) = [m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    volume = next(v for v in envoy["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "envoy-bootstrap"
    assert config_path.removeprefix(mount["mountPath"] + "/") == "bootstrap.yaml"
    ops_port, ops_paths = d.ops_routes(bootstrap)
    annotations = envoy["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ops_port and annotations["prometheus.io/path"] in ops_paths
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": ops_port}
    assert flags["--service-node"] == "$(POD_NAME)", "one node.id per pod: Aviary tracks ACKs by it"
    assert [e["name"] for e in container["env"]] == ["POD_NAME"]


def test_kubernetes_admin_token_is_generated_from_an_ignored_file() -> None:
    generator = d.kustomization()["secretGenerator"]
    files = [f for g in generator for f in g["files"]]
    ignored = (d.KUBERNETES_DIR / ".gitignore").read_text().split()
    for file in files:
        assert file in ignored, f"deploy/kubernetes/{file} holds a secret: list it in deploy/kubernetes/.gitignore"
    assert not any(p for p in d.KUBERNETES_DIR.glob("*.yaml") if "kind: Secret" in p.read_text()), (
        "no Secret with a token in git: it comes from the secretGenerator"
    )


def test_deploy_json_and_yaml_files_parse() -> None:
    for path in (d.REPO_ROOT / "deploy").rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            list(yaml.safe_load_all(path.read_text()))
        elif path.suffix == ".json":
            json.loads(path.read_text())


# ---- git-sync's checkout, as `aviary serve --policies` sees it ---------------------------------------


def _git_sync_publish(root: Path, worktree: str, version: str) -> None:
    """What git-sync does per commit: a new worktree, then an atomic swap of the `current` symlink
    (a relative link renamed over the old one), then the old worktree removed."""
    policies = root / ".worktrees" / worktree / "policies"
    policies.mkdir(parents=True)
    doc = {
        "apiVersion": "aviary.dev/v1",
        "kind": "Rollout",
        "metadata": {"name": "shop"},
        "spec": {"listener": {"port": 10000}, "hosts": ["*"], "version": version, "endpoints": ["127.0.0.1:8081"]},
    }
    (policies / "shop.yaml").write_text(yaml.safe_dump(doc))
    (root / ".worktrees" / worktree / ".git").write_text(f"gitdir: {root}/.git/worktrees/{worktree}\n")
    link = root / "current"
    old = os.readlink(link) if link.is_symlink() else None
    (root / "tmp-link").symlink_to(Path(".worktrees") / worktree)
    os.rename(root / "tmp-link", link)
    if old is not None:
        for path in sorted((root / old).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (root / old).rmdir()


async def test_a_git_sync_symlink_swap_is_picked_up_by_the_directory_watcher(tmp_path: Path) -> None:
    seen: list[tuple[list[str], list[PolicyError]]] = []

    async def on_change(policy_set: PolicySet, errors: list[PolicyError]) -> None:
        seen.append(([r.spec.version for r in policy_set.rollouts.values()], errors))

    _git_sync_publish(tmp_path, "1111", "v1")
    # The path aviary-deployment.yaml gives: through the symlink, never resolved once and kept.
    watcher = DirectoryWatcher(tmp_path / "current" / "policies", on_change, poll_interval=0.01)
    first = await watcher.load_once()
    assert [r.spec.version for r in first.rollouts.values()] == ["v1"]
    task = asyncio.create_task(watcher.run())
    try:
        for worktree, version in (("2222", "v2"), ("3333", "v3")):
            _git_sync_publish(tmp_path, worktree, version)

            def arrived(wanted: str = version) -> bool:
                return bool(seen) and seen[-1][0] == [wanted]

            await async_wait_until(arrived, 5.0, 0.01, what=f"{version} seen")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [versions for versions, _ in seen] == [["v2"], ["v3"]]
    assert all(not errors for _, errors in seen), "the removed worktree must never be read"


# ---- an RPC the xDS server does not serve ----------------------------------------------------------


async def test_an_unimplemented_rpc_is_refused_and_logged_once_per_method_and_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, port = await start_xds_server("127.0.0.1:0", AggregatedDiscoveryService(SnapshotCache(), lambda e: None))
    clusters = "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters"  # REST-style, not served
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in (clusters, clusters, "/some.Other/Call", clusters):
                call = channel.unary_unary(method)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(b"", timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unimplemented RPC ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"unimplemented RPC {clusters} from ipv4:127.0.0.1:")
    assert f"/{ADS_SERVICE}/StreamAggregatedResources and DeltaAggregatedResources" in lines[0]
    assert lines[1].startswith("unimplemented RPC /some.Other/Call from ipv4:127.0.0.1:")
    assert "StreamAggregatedResources" in lines[1]


# ---- tests/rig/containers.py: which runtime the Envoy and Prometheus fixtures use -----------------


def _no_ping() -> str | None:
    raise AssertionError("the Docker engine must not be asked unless AVIARY_TEST_DOCKER=1")


@pytest.mark.parametrize("env", [{}, {"AVIARY_TEST_DOCKER": "0"}, {"AVIARY_TEST_DOCKER": ""}])
def test_local_processes_are_the_default_and_docker_is_not_asked(env: dict[str, str]) -> None:
    choice = choose_runtime(env, _no_ping)
    assert not choice.containers and "local processes" in choice.reason


def test_containers_need_the_flag_and_a_reachable_engine() -> None:
    down = choose_runtime({"AVIARY_TEST_DOCKER": "1"}, lambda: "Cannot connect to the Docker daemon")
    assert not down.containers
    assert "no Docker engine (Cannot connect to the Docker daemon)" in down.reason
    up = choose_runtime({"AVIARY_TEST_DOCKER": "1"}, lambda: None)
    assert up.containers and "Docker containers" in up.reason


def test_local_runtime_leaves_the_fixtures_processes_alone(tmp_path: Path) -> None:
    envoy = EnvoyProcess(tmp_path / "envoy", 18000)
    process = envoy.process
    assert in_runtime(envoy, Runtime(False, "local")) is envoy
    assert envoy.process is process and type(process) is ManagedProcess


def test_container_runtime_runs_the_same_command_line_on_the_host_network(tmp_path: Path) -> None:
    envoy = EnvoyProcess(tmp_path / "envoy", 18000)
    args = list(envoy.process.args)
    in_runtime(envoy, Runtime(True, "containers"))  # nothing starts: no engine needed
    assert isinstance(envoy.process, ContainerProcess)
    spec = envoy.process.spec
    assert spec.image.startswith("envoyproxy/envoy:v1.40") and spec.entrypoint == ["envoy"]
    assert spec.command == args[1:], "same flags, bootstrap and log paths as the local process"
    assert spec.network_mode == "host", "127.0.0.1 ports and peers, as for a local process"
    workdir = str((tmp_path / "envoy").resolve())
    assert spec.volumes == [(workdir, workdir, "rw")]
    assert spec.user == f"{os.getuid()}:{os.getgid()}"
    assert envoy.process.log_path == tmp_path / "envoy" / f"{envoy.process.name}.log"
    assert not envoy.alive

    prometheus = in_runtime(PrometheusProcess(tmp_path / "prom", ["127.0.0.1:9901"]), Runtime(True, "containers"))
    assert isinstance(prometheus.process, ContainerProcess)
    assert prometheus.process.spec.entrypoint == ["/bin/prometheus"]
    assert any(a.startswith("--web.listen-address=127.0.0.1:") for a in prometheus.process.spec.command)
