"""Children start without Python code running between fork and exec, on uvloop too.

uvloop's own subprocess support calls ``PyOS_AfterFork_Child()`` in the forked child, which runs
every ``os.register_at_fork(after_in_child=...)`` hook while other threads' locks may be held: a
policy worker crashed there with SIGSEGV in 2 of 26 runs of test_validate_load. The marker
hook below is the deterministic witness of that path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from aviary.child_process import DEVNULL, PIPE, spawn

pytestmark = pytest.mark.timeout(60)

_marker: list[Path] = []


def _after_in_child() -> None:
    if _marker:
        _marker[0].write_text(str(os.getpid()))


os.register_at_fork(after_in_child=_after_in_child)


def _on_uvloop(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(main())


def test_no_python_runs_in_the_forked_child_on_uvloop(tmp_path: Path) -> None:
    _marker[:] = [tmp_path / "marker"]
    try:

        async def main() -> None:
            child = await spawn((sys.executable, "-c", "pass"), stdin=DEVNULL)
            assert await child.wait() == 0

        _on_uvloop(main)
        assert not (tmp_path / "marker").exists()

        async def uvloops_own() -> None:  # the witness: uvloop's path does run it
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
            await process.wait()

        _on_uvloop(uvloops_own)
        assert (tmp_path / "marker").exists()
    finally:
        _marker.clear()


async def test_pipes_exit_status_and_communicate() -> None:
    child = await spawn((sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper());"
                         "sys.stderr.write('e'); sys.exit(3)"), stdin=PIPE, stdout=PIPE, stderr=PIPE)
    out, err = await child.communicate(b"abc")
    assert (out, err, child.returncode) == (b"ABC", b"e", 3)


async def test_kill_reports_the_signal_and_a_dead_child_cannot_be_signalled() -> None:
    child = await spawn((sys.executable, "-c", "import time; time.sleep(60)"), stdout=PIPE)
    assert child.returncode is None
    child.kill()
    assert await child.wait() == -signal.SIGKILL
    assert child.stdout is not None and await child.stdout.read() == b""
    with pytest.raises(ProcessLookupError):
        child.kill()


async def test_a_missing_program_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await spawn((str(tmp_path / "no-such-program"),))
