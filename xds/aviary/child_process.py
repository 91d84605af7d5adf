"""Child processes for the event loop, started without running Python code in the forked child.

``asyncio.create_subprocess_exec`` on uvloop forks and then, in the child, calls
``PyOS_AfterFork_Child()`` and ``uv_loop_fork()`` before it execs (uvloop's
``handles/process.pyx``). In ``aviary serve`` other threads are running at that moment (grpc's
core, the Prometheus client's pool), so the child can inherit a lock or an allocator in the middle of
an update and crash before ``exec``: a policy worker died there (SIGSEGV, exit code -11) in 2 of 26
runs of ``tests/e2e/test_validate_load.py`` while the admin API was busy, and once in a CI run.

``subprocess.Popen`` forks (or vforks) in C and runs only async-signal-safe code until ``exec``,
whatever the other threads are doing. This module starts children with it and hands their pipes to
the running loop; the exit is learnt from a pidfd (Linux ≥ 5.3) that the loop watches, so waiting
costs no thread and no SIGCHLD handler, on uvloop and on asyncio's own loop alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["DEVNULL", "PIPE", "ChildProcess", "spawn"]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


class ChildProcess:
    """The part of ``asyncio.subprocess.Process`` Aviary uses: pipes as streams, kill, wait."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def returncode(self) -> int | None:
        """The exit status once the loop has seen the exit (negative: the signal that ended it)."""
        return self._popen.returncode

    def send_signal(self, signum: int) -> None:
        """Signal the child; ProcessLookupError once it has exited, like asyncio's Process."""
        if self._popen.returncode is not None:
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, signum)  # not yet reaped: the pid is still this child's

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        """Wait until the child has exited (its pipes may still hold output to read)."""
        return await asyncio.shield(self._exited)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        """Read stdout and stderr to their end and wait for the exit; with ``input``, write it first
        and close stdin (without, stdin is left as it is, as asyncio's Process does)."""

        async def feed() -> None:
            if self.stdin is None or input is None:
                return
            self.stdin.write(input)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await self.stdin.drain()
            self.stdin.close()

        async def read(stream: asyncio.StreamReader | None) -> bytes:
            return b"" if stream is None else await stream.read()

        _, out, err = await asyncio.gather(feed(), read(self.stdout), read(self.stderr))
        await self.wait()
        return out, err

    def _reaped(self) -> None:
        """The pidfd became readable: the child exited, and ``wait`` no longer blocks."""
        code = self._popen.wait()
        if not self._exited.done():
            self._exited.set_result(code)


async def spawn(
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Collection[int] = (),
    start_new_session: bool = False,
) -> ChildProcess:
    """Start ``argv``; ``PIPE`` gives a stream on the child's side, ``DEVNULL`` or None as in Popen.

    Raises OSError when the program cannot be started (not found, not executable, no memory).
    """
    loop = asyncio.get_running_loop()
    popen = subprocess.Popen(  # noqa: ASYNC220 -- as asyncio itself does: fork+exec, milliseconds
        list(argv), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
        pass_fds=tuple(pass_fds), start_new_session=start_new_session, close_fds=True,
    )  # fmt: skip
    child = ChildProcess(popen)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except BaseException:
        popen.kill()
        popen.wait()
        _close_pipes(popen)
        raise

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        child._reaped()

    loop.add_reader(pidfd, exited)
    try:
        if popen.stdin is not None:
            child.stdin = await _writer(loop, popen.stdin)
        if popen.stdout is not None:
            child.stdout = await _reader(loop, popen.stdout)
        if popen.stderr is not None:
            child.stderr = await _reader(loop, popen.stderr)
    except BaseException:
        popen.kill()
        _close_pipes(popen)
        raise
    return child


async def _reader(loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


async def _writer(loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> asyncio.StreamWriter:
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    return asyncio.StreamWriter(transport, protocol, None, loop)


def _close_pipes(popen: subprocess.Popen[bytes]) -> None:
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
