"""HTTP load against an Envoy listener, from a separate process (loadgen_worker.py)."""

from __future__ import annotations

import http.client
import json
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.rig.process import ManagedProcess
from tests.rig.waiting import wait_until

WORKER_SCRIPT = Path(__file__).with_name("loadgen_worker.py")


@dataclass(frozen=True)
class LoadResult:
    total: int
    failed: int
    by_version: dict[str, int]
    failures: list[str]  # the first 20, each "[+rel s at epoch] client N (mode): what"
    first_status_5xx_at: float | None  # epoch seconds (time.time())
    last_status_5xx_at: float | None = None
    first_failure_at: float | None = None
    last_failure_at: float | None = None
    by_status: dict[str, int] = field(default_factory=dict)  # "200", "503", "error" (no HTTP answer)
    started_at: float = 0.0
    duration_s: float = 0.0
    per_second: dict[int, dict[str, int]] = field(default_factory=dict)  # second -> {version|"failed": n}
    done: bool = True

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoadResult:
        return cls(
            total=int(d["total"]),
            failed=int(d["failed"]),
            by_version={str(k): int(v) for k, v in d["by_version"].items()},
            failures=[str(f) for f in d["failures"]],
            first_status_5xx_at=d.get("first_status_5xx_at"),
            last_status_5xx_at=d.get("last_status_5xx_at"),
            first_failure_at=d.get("first_failure_at"),
            last_failure_at=d.get("last_failure_at"),
            by_status={str(k): int(v) for k, v in d.get("by_status", {}).items()},
            started_at=float(d.get("started_at", 0.0)),
            duration_s=float(d.get("duration_s", 0.0)),
            per_second={int(k): dict(v) for k, v in d.get("per_second", {}).items()},
            done=bool(d.get("done", True)),
        )

    @property
    def succeeded(self) -> int:
        return self.total - self.failed

    def share(self, version: str) -> float:
        """Fraction of successful responses that came from ``version``."""
        return self.by_version.get(version, 0) / self.succeeded if self.succeeded else 0.0

    def minus(self, earlier: LoadResult) -> dict[str, int]:
        """Counts (per version, plus "failed") between an earlier snapshot and this one."""
        out = {v: n - earlier.by_version.get(v, 0) for v, n in self.by_version.items()}
        out["failed"] = self.failed - earlier.failed
        return out


class LoadGenerator:
    """``with LoadGenerator("127.0.0.1:10000", "app.example.com", workdir=d) as lg: ...; r = lg.stop()``.

    ``clients`` threads; even ones use one keep-alive connection, odd ones a new connection per
    request. ``rate_per_client`` (req/s) caps load so it does not starve the control plane.
    """

    def __init__(
        self,
        url_host_port: str,
        host_header: str,
        clients: int = 4,
        workdir: Path | None = None,
        *,
        rate_per_client: float | None = None,
        path: str = "/",
        timeout: float = 5.0,
        name: str = "loadgen",
    ) -> None:
        self.target = url_host_port
        self.host_header = host_header
        self.clients = clients
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="loadgen-"))
        self.rate_per_client = rate_per_client
        self.path = path
        self.timeout = timeout
        self.name = name
        self.result_file = self.workdir / f"{name}.result.json"
        self.progress_file = self.workdir / f"{name}.progress.json"
        self.process: ManagedProcess | None = None
        self.result: LoadResult | None = None

    def start(self, timeout: float = 10.0) -> LoadGenerator:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for f in (self.result_file, self.progress_file):
            f.unlink(missing_ok=True)
        self.result = None
        self.process = ManagedProcess(
            self.name,
            [
                sys.executable, WORKER_SCRIPT,
                "--target", self.target,
                "--host-header", self.host_header,
                "--path", self.path,
                "--clients", str(self.clients),
                "--rate", str(self.rate_per_client or 0),
                "--timeout", str(self.timeout),
                "--result-file", self.result_file,
                "--progress-file", self.progress_file,
                "--stop-on-stdin-eof",
            ],
            log_dir=self.workdir,
            stdin_pipe=True,
        ).start()  # fmt: skip
        proc = self.process

        def running() -> bool:
            if not proc.alive:
                raise RuntimeError(f"load generator exited: {proc.describe()}")
            return self.progress_file.exists()

        wait_until(running, timeout, what=f"{self.name} to start")
        return self

    def snapshot(self) -> LoadResult:
        """Totals so far (refreshed by the worker every 0.1 s)."""
        return LoadResult.from_json(json.loads(self.progress_file.read_text()))

    def wait_for_requests(self, n: int, timeout: float = 30.0) -> LoadResult:
        """Poll until at least ``n`` more requests complete than when called."""
        base = self.snapshot().total
        wait_until(lambda: self.snapshot().total >= base + n, timeout, what=f"{n} requests from {self.name}")
        return self.snapshot()

    def stop(self) -> LoadResult:
        """Graceful stop (SIGTERM); returns the final totals. Idempotent."""
        if self.result is not None:
            return self.result
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        proc = self.process
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.timeout + 10.0)
        finally:
            proc.stop()
        if not self.result_file.exists():
            raise RuntimeError(f"{self.name} wrote no result: {proc.describe()}")
        self.result = LoadResult.from_json(json.loads(self.result_file.read_text()))
        return self.result

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill9()

    def __enter__(self) -> LoadGenerator:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.alive:
            try:
                self.stop()
            finally:
                self.process.stop()


def send_requests(port: int, host: str, n: int, path: str = "/", timeout: float = 5.0) -> dict[str, int]:
    """``n`` GETs over one keep-alive connection (reopened after an error): counts by body + "failed"."""
    counts: dict[str, int] = {"failed": 0}
    conn: http.client.HTTPConnection | None = None
    try:
        for _ in range(n):
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                conn.request("GET", path, headers={"Host": host})
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", errors="replace")
                if resp.status == 200:
                    counts[body] = counts.get(body, 0) + 1
                else:
                    counts["failed"] += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                counts["failed"] += 1
                if conn is not None:
                    conn.close()
                    conn = None
    finally:
        if conn is not None:
            conn.close()
    return counts
