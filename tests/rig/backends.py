"""Python side of deploy/demo/backend.py: HTTP backends (one port per version) in one subprocess."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType
from urllib.parse import urlencode

from tests.rig.process import ManagedProcess
from tests.rig.simple_http import http_request
from tests.rig.waiting import wait_until

SERVER_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "backend.py"


class Backends:
    """``with Backends(workdir) as b: ports = b.start(["v1", "v2"])``.

    Each version port answers 200 with body = version and header ``x-version``; behaviour
    (error_rate, client_error_rate, latency_ms, orders_per_request) can be changed while it runs.
    ``GET /metrics`` on a version port is its Prometheus exposition (``orders_completed_total``
    and ``shop_requests_total``, labelled ``version``): :meth:`address` is a scrape target.
    """

    def __init__(self, workdir: Path, name: str = "backends") -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.ports_file = self.workdir / f"{name}.ports.json"
        self.ports: dict[str, int] = {}
        self.control_port: int | None = None
        self.process: ManagedProcess | None = None

    def start(
        self, versions: list[str], fixed_ports: dict[str, int] | None = None, timeout: float = 10.0
    ) -> dict[str, int]:
        """Start one port per version (kernel-picked unless in ``fixed_ports``); version -> port."""
        if self.process is not None and self.process.alive:
            raise RuntimeError(f"{self.name} already running")
        if len(set(versions)) != len(versions):
            raise ValueError(f"duplicate versions: {versions}")
        fixed = fixed_ports or {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports_file.unlink(missing_ok=True)
        specs = [f"{v}={fixed.get(v, 0)}" for v in versions]
        self.process = ManagedProcess(
            self.name,
            [sys.executable, SERVER_SCRIPT, "--ports-file", self.ports_file, *specs],
            log_dir=self.workdir,
            env={"PYTHONUNBUFFERED": "1"},
        ).start()
        proc = self.process

        def ports_written() -> bool:
            if not proc.alive:
                raise RuntimeError(f"backend server exited: {proc.describe()}")
            return self.ports_file.exists()

        try:
            wait_until(ports_written, timeout, what=f"{self.name} to listen")
            info = json.loads(self.ports_file.read_text())
            self.control_port = int(info["control"])
            self.ports = {str(k): int(v) for k, v in info["versions"].items()}
            wait_until(
                lambda: http_request(self._control(), "/ready", timeout=1.0).status == 200,
                timeout,
                what=f"{self.name} control port to answer",
            )
        except BaseException:
            self.stop()
            raise
        return dict(self.ports)

    def _control(self) -> int:
        if self.control_port is None:
            raise RuntimeError(f"{self.name} not started")
        return self.control_port

    def port(self, version: str) -> int:
        return self.ports[version]

    def address(self, version: str) -> str:
        """``127.0.0.1:<port>`` for a version, as used in Rollout endpoints."""
        return f"127.0.0.1:{self.ports[version]}"

    def set_behaviour(
        self,
        version: str,
        error_rate: float | None = None,
        latency_ms: float | None = None,
        *,
        client_error_rate: float | None = None,
        orders_per_request: float | None = None,
    ) -> None:
        """Change a version's behaviour; parameters left as None keep their current value.

        ``error_rate``: share answered 500; ``client_error_rate``: share answered 404;
        ``orders_per_request``: orders each 200 completes (``orders_completed_total``, 0.25 at start).
        """
        params: dict[str, str] = {"port": str(self.ports[version])}
        given = {"error_rate": error_rate, "latency_ms": latency_ms, "client_error_rate": client_error_rate,
                 "orders_per_request": orders_per_request}  # fmt: skip
        params.update({key: str(value) for key, value in given.items() if value is not None})
        resp = http_request(self._control(), f"/behaviour?{urlencode(params)}", method="POST")
        if resp.status != 200:
            raise RuntimeError(f"set_behaviour({version}) failed: {resp.status} {resp.body}")

    def metrics(self, version: str) -> str:
        """The version's Prometheus exposition (``GET /metrics`` on its port, what Prometheus scrapes)."""
        resp = http_request(self.ports[version], "/metrics")
        if resp.status != 200:
            raise RuntimeError(f"metrics of {version}: {resp.status} {resp.body}")
        return resp.body

    def counts(self) -> dict[str, int]:
        """Requests served per version so far."""
        raw: dict[str, int] = json.loads(http_request(self._control(), "/counts").body)
        by_port = {int(p): n for p, n in raw.items()}
        return {v: by_port.get(p, 0) for v, p in self.ports.items()}

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

    def __enter__(self) -> Backends:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
