"""Readers for what deploy/ and the Dockerfile ship, shared by tests/unit and tests/e2e test_deploy.py.

No Docker engine, kubectl or kustomize is needed: the Dockerfile is parsed into its instructions,
and the kustomization is rendered here from its ``resources:`` and ``secretGenerator:`` entries
(the only kustomize features deploy/kubernetes uses; an unknown key fails the tests).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aviary.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"

# The kustomization keys the renderer below understands.
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "images"}
CLUSTER_SCOPED = {"Namespace"}


# ---- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, ...
    text: str  # the rest of the line, continuations joined


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions in order, with ``\\`` continuations joined and comment lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip()))
    assert not pending, f"{path}: ends inside a continued line"
    return instructions


def exec_form(text: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (shell form is refused: signals would not reach
    `aviary serve`, which must see SIGTERM to stop cleanly)."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage (the image that ships)."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in instructions if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Sources of every COPY/ADD from the build context (``--from=`` copies come from a stage)."""
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.text)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        args = [w for w in words if not w.startswith("--")]
        sources.extend(args[:-1])
    return sources


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the image: what `docker run IMAGE` executes."""
    stage = final_stage(dockerfile_instructions())
    return exec_form(only(stage, "ENTRYPOINT").text) + exec_form(only(stage, "CMD").text)


def image_entrypoint() -> list[str]:
    return exec_form(only(final_stage(dockerfile_instructions()), "ENTRYPOINT").text)


def parse_aviary(argv: list[str]) -> argparse.Namespace:
    """``argv`` (starting with "aviary") parsed by the real CLI parser; SystemExit on a bad flag."""
    assert argv[0] == "aviary", argv
    return build_parser().parse_args(argv[1:])


def envoy_flags(args: list[str]) -> dict[str, str]:
    """Envoy's command-line flags as {flag: value}; Envoy takes "--flag value" only ("--flag=value"
    is refused), so a word with "=" is an error here too."""
    assert len(args) % 2 == 0 and all(a.startswith("-") and "=" not in a for a in args[::2]), args
    return dict(zip(args[::2], args[1::2], strict=True))


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


# ---- Compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


def bind_mounts(service: dict[str, Any]) -> dict[str, Path | str]:
    """container path -> host path (a Path, resolved from the compose directory) or volume name."""
    mounts: dict[str, Path | str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = (COMPOSE_DIR / source).resolve() if source.startswith((".", "/")) else source
    return mounts


# ---- Kubernetes -------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())
    return doc


def render_kustomization() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/kubernetes` creates (generated names without their hash
    suffix: kustomize rewrites the references along with the names)."""
    kust = kustomization()
    unknown = set(kust) - KUSTOMIZE_KEYS
    assert not unknown, f"kustomization.yaml uses {sorted(unknown)}: teach tests/rig/deploy_files.py to render it"
    objects: list[dict[str, Any]] = []
    for resource in kust["resources"]:
        objects.extend(doc for doc in yaml.safe_load_all((KUBERNETES_DIR / resource).read_text()) if doc)
    for generator in kust.get("secretGenerator", []):
        keys = [Path(str(f).split("=", 1)[0]).name for f in generator.get("files", [])]
        objects.append({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": generator["name"]},
            "type": generator.get("type", "Opaque"),
            "data": dict.fromkeys(keys, "cGxhY2Vob2xkZXI="),  # the file's content, unknown here
        })  # fmt: skip
    namespace = kust.get("namespace")
    images = {image["name"]: image for image in kust.get("images", [])}
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
        for container in pod_containers(obj):
            name, _, tag = container["image"].partition(":")
            if name in images:
                new = images[name]
                container["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag)}"
    return objects


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers and init containers of a workload's pod template (empty for other kinds)."""
    if obj["kind"] != "Deployment":
        return []
    spec = obj["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = [*spec.get("initContainers", []), *spec["containers"]]
    return containers


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def envoy_bootstrap_text(objects: list[dict[str, Any]]) -> str:
    """The edge Envoy's bootstrap, as the ConfigMap mounted by the envoy-edge Deployment holds it."""
    text: str = by_kind(objects, "ConfigMap")["envoy-bootstrap"]["data"]["bootstrap.yaml"]
    return text


def xds_cluster_address(bootstrap: dict[str, Any]) -> tuple[str, str, int]:
    """(cluster type, address, port) of the bootstrap's xds_cluster."""
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    sock = endpoint["address"]["socket_address"]
    return str(cluster.get("type", "STATIC")), str(sock["address"]), int(sock["port_value"])


def ops_routes(bootstrap: dict[str, Any]) -> tuple[int, set[str]]:
    """(port, paths) of the static "ops" listener that exposes /ready and /stats/prometheus."""
    (listener,) = [lst for lst in bootstrap["static_resources"]["listeners"] if lst["name"] == "ops"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    paths = {
        route["match"]["path"]
        for host in hcm["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if route["route"]["cluster"] == "envoy_admin"
    }
    return int(listener["address"]["socket_address"]["port_value"]), paths
