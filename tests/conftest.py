"""Shared fixtures: real processes from tests/rig, each stopped at teardown even when a test fails.

When a test fails, the state and log tail of every process it started are printed at teardown
(they show up under "Captured stdout teardown").
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import HealthCheck, settings

from tests.rig.backends import Backends
from tests.rig.containers import in_runtime, runtime
from tests.rig.control_plane import RunningControlPlane
from tests.rig.envoy import EnvoyProcess
from tests.rig.grpc_backend import GrpcBackends
from tests.rig.loadgen import LoadGenerator
from tests.rig.prometheus import PrometheusProcess

# Hypothesis fails an example that runs longer than 200 ms and a strategy it finds slow: a timing
# bound, which on this 2-core machine shared with Envoy, Prometheus and other suites is noise, not a
# finding (seen as one unexplained failure in a busy run). Properties are judged on their outcome only.
settings.register_profile("aviary", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("aviary")


class _Describable(Protocol):
    def describe(self) -> str: ...


_FAILED = pytest.StashKey[bool]()


def pytest_report_header() -> str:
    """Where the Envoy and Prometheus fixtures run (tests/rig/containers.py)."""
    return f"aviary rig: {runtime().reason}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_FAILED, False)
    if report.failed:
        item.stash[_FAILED] = True
    return report


def _dump_on_failure(request: pytest.FixtureRequest, things: list[_Describable]) -> None:
    if request.node.stash.get(_FAILED, False):
        for thing in things:
            print(f"\n===== {thing.describe()}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Per-test directory for configs, logs and data of the processes a test starts."""
    return tmp_path


@pytest.fixture
def backends(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Backends]:
    """An HTTP backend server, not yet started: ``ports = backends.start(["v1", "v2"])``."""
    b = Backends(workdir / "backends")
    try:
        yield b
    finally:
        _dump_on_failure(request, [b])
        b.stop()


@pytest.fixture
def grpc_backends(workdir: Path, request: pytest.FixtureRequest) -> Iterator[GrpcBackends]:
    """A gRPC backend server, not yet started: ``ports = grpc_backends.start(["v1", "v2"])``."""
    g = GrpcBackends(workdir / "grpc-backends")
    try:
        yield g
    finally:
        _dump_on_failure(request, [g])
        g.stop()


EnvoyFactory = Callable[..., EnvoyProcess]


@pytest.fixture
def envoy_factory(workdir: Path, request: pytest.FixtureRequest) -> Iterator[EnvoyFactory]:
    """``envoy_factory(xds_port, node_id="envoy-1", node_cluster="edge", delta=False, reports=False)`` -> a started
    EnvoyProcess (admin answering; call ``wait_ready()`` once the control plane serves it)."""
    made: list[EnvoyProcess] = []

    def make(
        xds_port: int,
        node_id: str = "envoy-1",
        node_cluster: str = "edge",
        delta: bool = False,
        start: bool = True,
        reports: bool = False,
    ) -> EnvoyProcess:
        # A local process, or a container with AVIARY_TEST_DOCKER=1 and a Docker engine (tests/rig/containers.py).
        envoy = in_runtime(EnvoyProcess(workdir / f"envoy-{len(made)}", xds_port, node_id, node_cluster, delta,
                                        reports=reports))
        made.append(envoy)
        return envoy.start() if start else envoy

    try:
        yield make
    finally:
        _dump_on_failure(request, list(made))
        for envoy in made:
            envoy.stop()


PrometheusFactory = Callable[..., PrometheusProcess]


@pytest.fixture
def prometheus_factory(workdir: Path, request: pytest.FixtureRequest) -> Iterator[PrometheusFactory]:
    """``prometheus_factory(["127.0.0.1:<envoy admin port>"], scrape_interval="1s")`` -> a started,
    ready PrometheusProcess (targets are scraped ~5 s later: use ``wait_for_target_up()``)."""
    made: list[PrometheusProcess] = []

    def make(scrape_targets: list[str], scrape_interval: str = "1s", start: bool = True) -> PrometheusProcess:
        prom = in_runtime(PrometheusProcess(workdir / f"prometheus-{len(made)}", scrape_targets, scrape_interval))
        made.append(prom)
        return prom.start() if start else prom

    try:
        yield make
    finally:
        _dump_on_failure(request, list(made))
        for prom in made:
            prom.stop()


LoadgenFactory = Callable[..., LoadGenerator]


@pytest.fixture
def loadgen_factory(workdir: Path) -> Iterator[LoadgenFactory]:
    """``loadgen_factory("127.0.0.1:PORT", "host.example", clients=4, rate_per_client=200)`` -> a
    started LoadGenerator; ``.stop()`` returns its LoadResult. Leftovers are killed at teardown."""
    made: list[LoadGenerator] = []

    def make(
        url_host_port: str,
        host_header: str,
        clients: int = 4,
        rate_per_client: float | None = None,
        path: str = "/",
    ) -> LoadGenerator:
        lg = LoadGenerator(
            url_host_port,
            host_header,
            clients,
            workdir / "loadgen",
            rate_per_client=rate_per_client,
            path=path,
            name=f"loadgen-{len(made)}",
        )
        made.append(lg)
        return lg.start()

    try:
        yield make
    finally:
        for lg in made:
            lg.kill()


ControlPlaneFactory = Callable[..., RunningControlPlane]


@pytest.fixture
def control_plane_factory(workdir: Path, request: pytest.FixtureRequest) -> Iterator[ControlPlaneFactory]:
    """``control_plane_factory(policies_dir, xds_port=0, poll_interval=0.2)`` -> a started
    RunningControlPlane (aviary.app.ControlPlane on its own loop thread); stopped at teardown."""
    made: list[RunningControlPlane] = []

    def make(
        policies_dir: Path | None = None, xds_port: int = 0, poll_interval: float = 0.2, start: bool = True
    ) -> RunningControlPlane:
        directory = policies_dir if policies_dir is not None else workdir / "policies"
        directory.mkdir(parents=True, exist_ok=True)
        plane = RunningControlPlane(directory, xds_port, poll_interval)
        made.append(plane)
        return plane.start() if start else plane

    try:
        yield make
    finally:
        _dump_on_failure(request, list(made))
        for plane in made:
            plane.stop()
