"""A subprocess that is always stopped: SIGTERM, then SIGKILL after a deadline."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.rig.waiting import wait_until

# Safety net: whatever is still running when the interpreter exits gets stopped.
_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop(timeout=5)


class ManagedProcess:
    """One child process with its stdout+stderr in ``<log_dir>/<name>.log``.

    Use as a context manager, or call :meth:`stop` from a fixture finalizer.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str | os.PathLike[str]],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.args = [os.fspath(a) for a in args]
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{name}.log"
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stdin_pipe = stdin_pipe
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> ManagedProcess:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = None
        if self.env is not None:
            env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C on pytest does not hit the child first
            )
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def send_signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; TimeoutError if it does not."""
        assert self.proc is not None
        proc = self.proc
        wait_until(lambda: proc.poll() is not None, timeout, what=f"{self.name} to exit")
        return proc.returncode

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._close_stdin()
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL now (a crash, as far as the peers can tell) and reap the process."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    # ---- diagnostics -----------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_errors(self, limit: int = 20) -> list[str]:
        """Log lines that look like errors (error/critical/Traceback/Exception)."""
        keys = ("error", "critical", "traceback", "exception", "fatal", "panic")
        hits = [ln for ln in self.log_text().splitlines() if any(k in ln.lower() for k in keys)]
        return hits[-limit:]

    def describe(self) -> str:
        """A short text for assertion messages: state, exit code and the log tail."""
        state = "running" if self.alive else f"exited with {self.returncode}"
        return f"{self.name} (pid {self.pid}, {state}); log {self.log_path}:\n{self.log_tail()}"

    def ensure_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(f"{self.name} is not running: {self.describe()}")

    # ---- context manager -------------------------------------------------------------------
    def __enter__(self) -> ManagedProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
