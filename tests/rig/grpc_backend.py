"""Python side of grpc_backend_server.py: gRPC backends (one port per version) in one subprocess."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType

import grpc

from tests.rig.process import ManagedProcess
from tests.rig.waiting import wait_until

SERVER_SCRIPT = Path(__file__).with_name("grpc_backend_server.py")
VERSION_METHOD = "/aviary.test.Echo/Version"
COUNT_METHOD = "/aviary.test.Echo/Count"


def call_version(channel: grpc.Channel, timeout: float = 5.0, wait_for_ready: bool = False) -> str:
    """Call /aviary.test.Echo/Version on ``channel``; the answering backend's version."""
    rpc = channel.unary_unary(VERSION_METHOD)  # no (de)serializers: raw bytes both ways
    answer: bytes = rpc(b"", timeout=timeout, wait_for_ready=wait_for_ready)
    return answer.decode()


class GrpcBackends:
    """``with GrpcBackends(workdir) as g: ports = g.start(["v1", "v2"])``."""

    def __init__(self, workdir: Path, name: str = "grpc-backends") -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.ports_file = self.workdir / f"{name}.ports.json"
        self.ports: dict[str, int] = {}
        self.process: ManagedProcess | None = None

    def start(self, versions: list[str], timeout: float = 15.0) -> dict[str, int]:
        """Start one port per version; returns version -> port once each one answers."""
        if len(set(versions)) != len(versions):
            raise ValueError(f"duplicate versions: {versions}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports_file.unlink(missing_ok=True)
        self.process = ManagedProcess(
            self.name,
            [sys.executable, SERVER_SCRIPT, "--ports-file", self.ports_file, *versions],
            log_dir=self.workdir,
            env={"PYTHONUNBUFFERED": "1"},
        ).start()
        proc = self.process

        def ports_written() -> bool:
            if not proc.alive:
                raise RuntimeError(f"grpc backend server exited: {proc.describe()}")
            return self.ports_file.exists()

        try:
            wait_until(ports_written, timeout, what=f"{self.name} to listen")
            info = json.loads(self.ports_file.read_text())
            self.ports = {str(k): int(v) for k, v in info["versions"].items()}
            for version, port in self.ports.items():
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    got = call_version(ch, timeout=timeout, wait_for_ready=True)
                if got != version:
                    raise RuntimeError(f"port {port} answered {got!r}, expected {version!r}")
        except BaseException:
            self.stop()
            raise
        return dict(self.ports)

    def address(self, version: str) -> str:
        return f"127.0.0.1:{self.ports[version]}"

    def served(self, version: str, timeout: float = 5.0) -> int:
        """Version calls the ``version`` port has served so far (the start-up probe included)."""
        with grpc.insecure_channel(self.address(version)) as channel:
            answer: bytes = channel.unary_unary(COUNT_METHOD)(b"", timeout=timeout)
        return int(answer.decode())

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)

    def kill9(self) -> None:
        if self.process is not None:
            self.process.kill9()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def describe(self) -> str:
        return self.process.describe() if self.process is not None else f"{self.name} (never started)"

    def __enter__(self) -> GrpcBackends:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
