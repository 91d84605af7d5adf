"""The control plane's own /metrics, scraped while a real Envoy is served, and `--log-format json`.

An in-process plane (``RunningControlPlane``; a start hook turns on ``metrics_address=127.0.0.1:0``)
serves one Envoy. The test makes things happen and checks that each metric says exactly that:

- Envoy connects (node cluster ``edge``): one connected proxy, responses, bytes and push->ACK
  latencies for LDS, RDS, CDS and EDS;
- a canary with analysis against a tiny fake Prometheus that answers fixed values: the rollout's
  phase, canary weight and step, and each check's last value and result;
- a second rollout whose listener port is held by a plain socket: Envoy NACKs that LDS update once;
- an invalid policy file: a reload that counts as a rejection.

Policies from a local git repository give ``aviary_policy_git_info{commit=...}``. Finally
``aviary serve --log-format json`` runs briefly as a subprocess and every line it writes must be a
JSON object with ts, level, logger and message.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aviary.app import ControlPlane, ServeConfig
from aviary.policy.rollout_state import Resume
from tests.conftest import _FAILED, ControlPlaneFactory, EnvoyFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import RunningControlPlane
from tests.rig.envoy import EnvoyProcess
from tests.rig.fake_prometheus import Answer, FakePrometheus, vector_body
from tests.rig.git_repo import GitRepo
from tests.rig.loadgen import send_requests
from tests.rig.ports import free_ports, port_open
from tests.rig.process import ManagedProcess
from tests.rig.serve_process import AVIARY
from tests.rig.simple_http import http_request
from tests.rig.waiting import async_wait_until, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAME = "shop"
HOST = "shop.example.com"
NODE = "envoy-1"
XDS_TYPES = ("LDS", "RDS", "CDS", "EDS")

# What the fake Prometheus answers: a query containing the key gets the value.
REQUESTS = "envoy_cluster_upstream_rq_xx"  # the request count behind minRequests
LATENCY_VALUE = 123.5
SUCCESS_VALUE = 99.25
ANSWERS = {REQUESTS: "1000", "test_latency_ms": str(LATENCY_VALUE), "test_success_percent": str(SUCCESS_VALUE)}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------------------ scraping


def scrape(port: int) -> Samples:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    response = http_request(port, "/metrics", timeout=5.0)
    assert response.status == 200, response
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of every sample called ``name``."""
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name and label in dict(key)}


# ------------------------------------------------------------------------------ fake Prometheus


@pytest.fixture
def fake_prometheus() -> Iterator[FakePrometheus]:
    """Answers each query with a vector holding the value of the first ANSWERS key in the query."""

    def respond(query: str) -> Answer:
        return Answer(body=vector_body(*[answer for key, answer in ANSWERS.items() if key in query][:1]))

    with FakePrometheus(respond=respond) as fake:
        yield fake


# ------------------------------------------------------------------------------ policies


def write_doc(policies: Path, file_name: str, text: str) -> None:
    tmp = policies / f".{file_name}.tmp"
    tmp.write_text(text)
    tmp.replace(policies / file_name)  # the watcher never reads half a file


def rollout_doc(name: str, port: int, version: str, endpoint: str, host: str, **extra: Any) -> str:
    spec: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": port},
        "hosts": [host],
        "version": version,
        "endpoints": [endpoint],
        **extra,
    }
    return yaml.safe_dump({"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": name}, "spec": spec})


def with_metrics(plane: ControlPlane) -> None:
    """Start hook (between load() and serve()): serve /metrics on a kernel-picked port.

    xds_address is set too: RunningControlPlane passes it positionally, which since ServeConfig
    gained git_branch/git_path lands in git_branch, leaving the default 127.0.0.1:18000.
    """
    plane.config = replace(plane.config, metrics_address="127.0.0.1:0", xds_address="127.0.0.1:0")


# ------------------------------------------------------------------------------ 1. metrics with Envoy


@dataclass
class Stage:
    policies: Path
    backends: Backends
    plane: RunningControlPlane
    envoy: EnvoyProcess
    port: int
    metrics_port: int

    def scrape(self) -> Samples:
        return scrape(self.metrics_port)

    def weights(self) -> dict[str, int]:
        return self.envoy.route_weights(f"route-127.0.0.1-{self.port}").get(NAME, {})


@pytest.fixture
def stage(
    workdir: Path, backends: Backends, envoy_factory: EnvoyFactory, control_plane_factory: ControlPlaneFactory
) -> Stage:
    backends.start(["v1", "v2"])
    policies = workdir / "policies"
    policies.mkdir()
    (port,) = free_ports(1)
    write_doc(policies, f"{NAME}.yaml", rollout_doc(NAME, port, "v1", backends.address("v1"), HOST))
    plane = control_plane_factory(policies, start=False).start(hook=with_metrics)
    assert plane.plane is not None
    metrics_port = plane.plane.metrics_port
    assert metrics_port > 0
    envoy = envoy_factory(plane.xds_port, node_id=NODE, node_cluster="edge")
    envoy.wait_ready()
    envoy.wait_for_listener(port)
    stage = Stage(policies, backends, plane, envoy, port, metrics_port)
    wait_until(lambda: stage.weights() == {f"{NAME}_v1": 100}, 10, what="Envoy routes 100 % to v1")
    return stage


def test_metrics_say_what_happened(stage: Stage, fake_prometheus: FakePrometheus) -> None:
    # ---- Envoy connected and ACKed its first configuration
    def acked_every_type() -> Samples | None:
        s = stage.scrape()
        counts = by_label(s, "aviary_xds_push_ack_seconds_count", "type")
        return s if all(counts.get(t, 0) > 0 for t in XDS_TYPES) else None

    first = wait_until(acked_every_type, 10, what="a push->ACK latency for every xDS type")
    assert by_label(first, "aviary_connected_proxies", "node_cluster") == {"edge": 1.0}
    responses = by_label(first, "aviary_xds_responses_total", "type")
    sent_bytes = by_label(first, "aviary_xds_response_bytes_total", "type")
    acks = by_label(first, "aviary_xds_push_ack_seconds_count", "type")
    for kind in XDS_TYPES:
        assert responses.get(kind, 0) > 0, (kind, responses)
        assert sent_bytes.get(kind, 0) > 0, (kind, sent_bytes)
        assert acks[kind] <= responses[kind], (kind, acks, responses)  # an ACK answers a response
        latency_sum = value(first, "aviary_xds_push_ack_seconds_sum", type=kind)
        assert latency_sum is not None and 0 <= latency_sum < 10 * acks[kind], (kind, latency_sum)
        assert value(first, "aviary_xds_push_ack_seconds_bucket", type=kind, le="+Inf") == acks[kind]
    assert sum(by_label(first, "aviary_xds_nacks_total", "type").values()) == 0
    assert value(first, "aviary_rollout_phase", rollout=NAME, phase="Stable") == 1.0
    assert sum(by_label(first, "aviary_rollout_phase", "phase").values()) == 1.0
    assert value(first, "aviary_rollout_canary_weight", rollout=NAME) == 0.0
    assert value(first, "aviary_rollout_step", rollout=NAME) == 0.0
    assert not by_label(first, "aviary_check_value", "check")
    reloads = value(first, "aviary_policy_reloads_total")
    assert reloads is not None and reloads >= 1
    assert value(first, "aviary_policy_rejections_total") == 0.0
    assert not [k for k in first if k[0] == "aviary_policy_git_info"]  # a directory, not git

    # ---- a canary with analysis: 20 %, checks pass, then a pause step (Paused, step index 1)
    analysis = {
        "prometheus": fake_prometheus.url,
        "checkEvery": "500ms",
        "minRequests": 10,
        "metrics": [
            {"name": "latency", "query": 'test_latency_ms{cluster="{{ canary }}"}', "max": 500},
            {"name": "success", "query": 'test_success_percent{cluster="{{ canary }}"}', "min": 99},
        ],
    }
    strategy = {"steps": [20, {"pause": {}}, 60, {"pause": {}}], "interval": "1s"}
    write_doc(
        stage.policies,
        f"{NAME}.yaml",
        rollout_doc(NAME, stage.port, "v2", stage.backends.address("v2"), HOST, strategy=strategy, analysis=analysis),
    )

    def paused_at_step_2() -> Samples | None:
        s = stage.scrape()
        return s if value(s, "aviary_rollout_phase", rollout=NAME, phase="Paused") == 1.0 else None

    canary = wait_until(paused_at_step_2, 20, interval=0.1, what="shop Paused at its pause step")
    phases = by_label(canary, "aviary_rollout_phase", "phase")
    assert phases == {"Stable": 0.0, "Progressing": 0.0, "Paused": 1.0, "Promoting": 0.0, "Guarding": 0.0,
                      "RolledBack": 0.0}, phases
    stages = by_label(canary, "aviary_rollout_stage", "stage")
    assert set(stages) == {"adding", "shifting", "retiring", "removing", "settled"} and sum(stages.values()) == 1.0
    [plan] = [dict(k) for (n, k), _ in canary.items() if n == "aviary_rollout_plan_info"]
    assert plan["rollout"] == NAME and len(plan["digest"]) == 12 and plan["stickiness"] == "", plan
    assert value(canary, "aviary_rollout_canary_weight", rollout=NAME) == 20.0
    assert value(canary, "aviary_rollout_step", rollout=NAME) == 1.0
    assert by_label(canary, "aviary_check_value", "check") == {"latency": LATENCY_VALUE, "success": SUCCESS_VALUE}
    for check in ("latency", "success"):
        results = {
            dict(k)["result"]: v
            for (n, k), v in canary.items()
            if n == "aviary_check_result" and dict(k)["check"] == check and dict(k)["rollout"] == NAME
        }
        assert results == {"pass": 1.0, "inconclusive": 0.0, "fail": 0.0}, (check, results)
    assert any("test_latency_ms" in q and f"{NAME}_v2" in q for q in fake_prometheus.queries), fake_prometheus.queries
    assert stage.weights() == {f"{NAME}_v1": 80, f"{NAME}_v2": 20}
    assert sum(by_label(canary, "aviary_xds_nacks_total", "type").values()) == 0
    more = by_label(canary, "aviary_xds_responses_total", "type")
    assert more["RDS"] > responses["RDS"] and more["CDS"] > responses["CDS"], (responses, more)

    # ---- a listener Envoy cannot bind: exactly one LDS NACK
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        blocked_port = holder.getsockname()[1]
        write_doc(
            stage.policies,
            "blocked.yaml",
            rollout_doc("blocked", blocked_port, "v1", stage.backends.address("v1"), "blocked.example.com"),
        )

        def lds_nacked() -> Samples | None:
            s = stage.scrape()
            return s if value(s, "aviary_xds_nacks_total", type="LDS") else None

        nacked = wait_until(lds_nacked, 15, what="Envoy to NACK the listener it cannot bind")
        assert stage.envoy.stats().get("listener_manager.lds.update_rejected") == 1
        # Unrelated changes afterwards (shop resumed: 60 %, then its next pause step) are pushed and
        # ACKed; the NACKed listener is not sent again.
        assert stage.plane.call(lambda p: p.runner.command(NAME, Resume())).weight == 60
        wait_until(lambda: stage.weights() == {f"{NAME}_v1": 40, f"{NAME}_v2": 60}, 10, what="Envoy at 60 % v2")

        def paused_at_step_4() -> Samples | None:
            s = stage.scrape()
            return s if value(s, "aviary_rollout_step", rollout=NAME) == 3.0 else None

        after_nack = wait_until(paused_at_step_4, 15, interval=0.1, what="shop Paused at its second pause step")
    finally:
        holder.close()
    assert by_label(nacked, "aviary_xds_nacks_total", "type") == {"LDS": 1.0}
    assert by_label(after_nack, "aviary_xds_nacks_total", "type") == {"LDS": 1.0}
    assert value(after_nack, "aviary_rollout_phase", rollout="blocked", phase="Stable") == 1.0
    assert value(after_nack, "aviary_rollout_canary_weight", rollout=NAME) == 60.0
    assert value(after_nack, "aviary_rollout_phase", rollout=NAME, phase="Paused") == 1.0
    reloads_before = value(after_nack, "aviary_policy_reloads_total")
    assert reloads_before is not None and reloads_before >= reloads + 2  # the canary and the blocked file

    # ---- an invalid file: one more reload, and it counts as a rejection
    write_doc(stage.policies, "broken.yaml", "apiVersion: aviary.dev/v1\nkind: Rollout\nmetadata: {name: Bad_Name}\n")

    def rejected() -> Samples | None:
        s = stage.scrape()
        return s if value(s, "aviary_policy_rejections_total") else None

    broken = wait_until(rejected, 10, what="the invalid file to count as a rejection")
    assert value(broken, "aviary_policy_rejections_total") == 1.0
    assert value(broken, "aviary_policy_reloads_total") == reloads_before + 1
    errors = stage.plane.call(lambda p: [(e.file, e.field) for e in p.policy_errors])
    assert errors and all(file.endswith("broken.yaml") for file, _ in errors), errors
    assert send_requests(stage.port, HOST, 20)["failed"] == 0  # the last good policies keep serving
    assert by_label(stage.scrape(), "aviary_connected_proxies", "node_cluster") == {"edge": 1.0}
    summary = {
        "responses": by_label(broken, "aviary_xds_responses_total", "type"),
        "bytes": by_label(broken, "aviary_xds_response_bytes_total", "type"),
        "acks": by_label(broken, "aviary_xds_push_ack_seconds_count", "type"),
        "ack_seconds_sum": by_label(broken, "aviary_xds_push_ack_seconds_sum", "type"),
        "nacks": by_label(broken, "aviary_xds_nacks_total", "type"),
        "reloads": value(broken, "aviary_policy_reloads_total"),
        "prometheus_queries": len(fake_prometheus.queries),
    }
    print(f"\n[observability] {summary}")
    for kind in XDS_TYPES:  # each response is ACKed at most once (superseded ones never)
        assert summary["acks"][kind] <= summary["responses"][kind], summary  # type: ignore[index]

    # ---- Envoy gone: no connected proxy left
    stage.envoy.stop()
    wait_until(
        lambda: not by_label(stage.scrape(), "aviary_connected_proxies", "node_cluster"),
        10,
        what="Envoy's stream to leave aviary_connected_proxies",
    )


# ------------------------------------------------------------------------------ 2. git commit info


async def test_git_commit_info_metric(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    sha = repo.commit({f"{NAME}.yaml": rollout_doc(NAME, 10000, "v1", "127.0.0.1:8081", HOST)}, "shop v1")
    config = ServeConfig(
        str(repo.path), xds_address="127.0.0.1:0", metrics_address="127.0.0.1:0", state_dir=tmp_path / "state"
    )
    plane = ControlPlane(config)
    await plane.start()
    try:
        def with_commit() -> Samples | None:
            s = scrape(plane.metrics_port)
            return s if value(s, "aviary_policy_git_info", commit=sha) else None

        samples = await async_wait_until(with_commit, 10, what=f"aviary_policy_git_info{{commit={sha}}}")
        assert value(samples, "aviary_policy_git_info", commit=sha) == 1.0
        assert [dict(k) for n, k in samples if n == "aviary_policy_git_info"] == [{"commit": sha}]
        assert value(samples, "aviary_rollout_phase", rollout=NAME, phase="Stable") == 1.0
        assert value(samples, "aviary_policy_rejections_total") == 0.0
    finally:
        await plane.stop(0)


# ------------------------------------------------------------------------------ 3. --log-format json


def test_log_format_json_every_line_is_an_object(workdir: Path, request: pytest.FixtureRequest) -> None:
    policies = workdir / "policies"
    policies.mkdir()
    xds_port, admin_port, metrics_port, listener_port = free_ports(4)
    write_doc(policies, f"{NAME}.yaml", rollout_doc(NAME, listener_port, "v1", "127.0.0.1:8081", HOST))
    write_doc(policies, "broken.yaml", "kind: Rollout\nspec: [not, a, mapping\n")  # a warning line too
    proc = ManagedProcess(
        "aviary-json",
        [
            str(AVIARY), "serve", "--log-format", "json",
            "--policies", str(policies),
            "--xds-address", f"127.0.0.1:{xds_port}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--metrics-address", f"127.0.0.1:{metrics_port}",
            "--state", str(workdir / "state.db"),
        ],
        workdir,
        env={"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        proc.start()

        def serving() -> bool:
            proc.ensure_alive()
            return port_open(xds_port, timeout=0.2) and port_open(metrics_port, timeout=0.2)

        wait_until(serving, 20, interval=0.02, what="aviary serve to listen")
        assert value(scrape(metrics_port), "aviary_policy_rejections_total") == 1.0
        code = proc.stop(timeout=10)
        text = proc.log_text()
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {proc.describe()}")
        proc.stop()
    assert code == 0, proc.describe()
    lines = text.splitlines()
    assert lines, "aviary serve wrote nothing"
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not JSON: {line!r}\n{text}")
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), line
        assert isinstance(entry["message"], str) and entry["message"], line
        entries.append(entry)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("xDS (ADS and per-type services) listening on 127.0.0.1:") for m in messages), messages
    assert any(e["level"] == "warning" and "broken.yaml" in e["message"] for e in entries), messages
    with contextlib.suppress(KeyError):
        print(f"\n[observability] json log: {len(entries)} lines, loggers {sorted({e['logger'] for e in entries})}")
