"""`aviary serve` as a real subprocess on fixed free ports, restartable with the same arguments.

Every start is a new :class:`ManagedProcess` (and log file) with the same command line, so a test
can ``kill9()`` the current one and start another that binds the same xDS port Envoy keeps dialling.
The process logs JSON (``--log-format json``); :meth:`AviaryServe.log_entries` parses it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.rig.ports import free_ports, port_open
from tests.rig.process import ManagedProcess
from tests.rig.waiting import wait_until

AVIARY = Path(sys.executable).parent / "aviary"


class AviaryServe:
    """`aviary serve --state FILE` subprocesses; every start is a new process (and log) with the same args."""

    def __init__(self, workdir: Path, policies: Path, state: Path) -> None:
        self.workdir = workdir
        self.policies = policies
        self.state = state
        self.xds_port, self.admin_port, self.metrics_port = free_ports(3)
        self.processes: list[ManagedProcess] = []

    def args(self, *extra: str) -> list[str]:
        return [
            str(AVIARY), "--log-format", "json", "serve",
            "--policies", str(self.policies),
            "--xds-address", f"127.0.0.1:{self.xds_port}",
            "--admin-address", f"127.0.0.1:{self.admin_port}",
            "--metrics-address", f"127.0.0.1:{self.metrics_port}",
            "--state", str(self.state),
            *extra,
        ]  # fmt: skip

    def spawn(self, *extra: str) -> ManagedProcess:
        """Start a new process without waiting for it to listen."""
        proc = ManagedProcess(
            f"aviary-{len(self.processes)}", self.args(*extra), self.workdir, env={"PYTHONUNBUFFERED": "1"}
        )
        self.processes.append(proc)
        return proc.start()

    @property
    def current(self) -> ManagedProcess:
        return self.processes[-1]

    def start(self, *extra: str, timeout: float = 20.0) -> ManagedProcess:
        """Spawn and wait until the xDS port accepts connections (state loaded, policies applied)."""
        proc = self.spawn(*extra)

        def listening() -> bool:
            proc.ensure_alive()
            return port_open(self.xds_port, timeout=0.2)

        wait_until(listening, timeout, interval=0.02, what=f"aviary serve on xDS port {self.xds_port}")
        return proc

    def log_entries(self, proc: ManagedProcess | None = None) -> list[dict[str, Any]]:
        """The JSON objects in the log of ``proc`` (default: the current process), in order."""
        entries = []
        for line in (proc or self.current).log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def proxy_connected(self, node: str, proc: ManagedProcess | None = None) -> bool:
        """The log of ``proc`` (default: the current process) says ``node`` opened a stream to it."""
        return any(e.get("message", "").startswith(f"proxy connected: node={node} ") for e in self.log_entries(proc))

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``aviary <args> --admin <this plane's admin address>`` (loopback: no token); exit 0 asserted."""
        done = subprocess.run(
            [str(AVIARY), *args, "--admin", f"127.0.0.1:{self.admin_port}"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"aviary {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
        return done

    def cli_json(self, *args: str) -> Any:
        """``aviary <args> -o json`` against this plane, parsed."""
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.processes) or "aviary serve (never started)"


def saved_rollout(state: Path, name: str) -> dict[str, Any] | None:
    """The persisted RolloutStatus (as JSON) of one rollout, read through a read-only connection."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=2.0)
    try:
        row = db.execute("SELECT status FROM rollouts WHERE name = ?", (name,)).fetchone()
    finally:
        db.close()
    status: dict[str, Any] | None = json.loads(row[0]) if row else None
    return status
