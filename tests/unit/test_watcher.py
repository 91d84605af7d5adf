"""DirectoryWatcher: change detection, callbacks only on real change, reload(), and logging."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from aviary.policy import watcher as watcher_module
from aviary.policy.loader import LoadResult
from aviary.policy.schema import PolicyError, PolicySet
from aviary.policy.watcher import DirectoryWatcher
from aviary.policy.workers import PolicyWorkers
from tests.rig.policies import rollout_text
from tests.rig.policy_changes import PolicyRecorder, poll_until

DEADLINE = 5.0


def policy(name: str, version: str = "v1", host: str = "*") -> str:
    return rollout_text(name, version, host)


async def wait_until(condition: Callable[[], bool]) -> None:
    await poll_until(condition, DEADLINE, interval=0.005)


class Turns:
    """Counts directory scans so a test can wait for the watcher to finish whole loop turns."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scans = 0
        self.loads = 0
        scan = watcher_module._fingerprint

        def counting_scan(directory: Path) -> watcher_module.Fingerprint:
            self.scans += 1
            return scan(directory)

        load = PolicyWorkers.load_directory  # the watcher loads in a worker process

        async def counting_load(workers: PolicyWorkers, directory: Path) -> LoadResult:
            self.loads += 1
            return await load(workers, directory)

        monkeypatch.setattr(watcher_module, "_fingerprint", counting_scan)
        monkeypatch.setattr(PolicyWorkers, "load_directory", counting_load)

    async def after_next_load(self) -> None:
        """Wait until a load happened and the loop turn holding it is over (a later scan ran)."""
        loads = self.loads
        await wait_until(lambda: self.loads > loads)
        scans = self.scans
        await wait_until(lambda: self.scans > scans + 1)


@contextlib.asynccontextmanager
async def running(watcher: DirectoryWatcher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(watcher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make(tmp_path: Path) -> tuple[DirectoryWatcher, PolicyRecorder]:
    recorder = PolicyRecorder(DEADLINE)
    return DirectoryWatcher(tmp_path, recorder, poll_interval=0.01), recorder


async def test_load_once_returns_the_policy_set(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy("a"))
    watcher, recorder = make(tmp_path)
    policy_set = await watcher.load_once()
    assert list(policy_set.rollouts) == ["a"]
    assert watcher.current is policy_set
    assert recorder.changes.empty()


async def test_errors_are_logged_one_line_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.yaml").write_text("kind: [")
    (tmp_path / "b.yaml").write_text(policy("b", version="V1"))
    watcher, _ = make(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aviary.policy"):
        await watcher.load_once()
    messages = [r.getMessage() for r in caplog.records if r.name == "aviary.policy"]
    assert len(messages) == 2
    assert messages[0].startswith(f"policy rejected: {tmp_path / 'a.yaml'}: -: invalid YAML at line")
    assert messages[1].startswith(f"policy rejected: {tmp_path / 'b.yaml'}: spec.version: invalid version")


async def test_run_without_load_once_reports_the_first_state(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy("a"))
    watcher, recorder = make(tmp_path)
    async with running(watcher):
        policy_set, errors = await recorder.next()
    assert list(policy_set.rollouts) == ["a"] and errors == []


async def test_detects_added_changed_and_removed_files(tmp_path: Path) -> None:
    watcher, recorder = make(tmp_path)
    await watcher.load_once()
    async with running(watcher):
        (tmp_path / "a.yaml").write_text(policy("a"))
        policy_set, _ = await recorder.next()
        assert list(policy_set.rollouts) == ["a"]

        (tmp_path / "a.yaml").write_text(policy("a", version="v22"))
        policy_set, _ = await recorder.next()
        assert policy_set.rollouts["a"].spec.version == "v22"

        (tmp_path / "a.yaml").unlink()
        policy_set, errors = await recorder.next()
        assert policy_set.rollouts == {} and errors == []


async def test_broken_file_reports_errors_and_keeps_serving(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy("a"))
    watcher, recorder = make(tmp_path)
    before = await watcher.load_once()
    async with running(watcher):
        (tmp_path / "a.yaml").write_text("kind: [")
        policy_set, errors = await recorder.next()
        assert policy_set.rollouts == before.rollouts
        assert [(e.field) for e in errors] == ["-"]

        (tmp_path / "a.yaml").write_text(policy("a"))
        policy_set, errors = await recorder.next()
        assert policy_set.rollouts == before.rollouts and errors == []


async def test_no_callback_when_nothing_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(policy("a"))
    turns = Turns(monkeypatch)
    watcher, recorder = make(tmp_path)
    await watcher.load_once()
    async with running(watcher):
        # Same content, new mtime: the watcher reloads but must not call back.
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        await turns.after_next_load()
        assert recorder.changes.empty()
        (tmp_path / "ignored.txt").write_text("x")
        watcher.reload()
        await turns.after_next_load()
        assert recorder.changes.empty()


async def test_reload_picks_up_a_change_the_fingerprint_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(policy("a", version="v1"))
    turns = Turns(monkeypatch)
    watcher, recorder = make(tmp_path)
    await watcher.load_once()
    async with running(watcher):
        scans = turns.scans
        await wait_until(lambda: turns.scans > scans + 1)  # the loop is idling
        stat = path.stat()
        path.write_text(policy("a", version="v2"))  # same size...
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and same mtime
        scans = turns.scans
        await wait_until(lambda: turns.scans > scans + 1)
        assert recorder.changes.empty()
        watcher.reload()
        policy_set, _ = await recorder.next()
        assert policy_set.rollouts["a"].spec.version == "v2"


async def test_callback_failure_does_not_stop_the_watcher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: asyncio.Queue[PolicySet] = asyncio.Queue()

    async def flaky(policy_set: PolicySet, errors: list[PolicyError]) -> None:
        await seen.put(policy_set)
        if seen.qsize() == 1:
            raise RuntimeError("publish failed")

    watcher = DirectoryWatcher(tmp_path, flaky, poll_interval=0.01)
    async with running(watcher) as task:
        await asyncio.wait_for(seen.get(), DEADLINE)
        (tmp_path / "a.yaml").write_text(policy("a"))
        policy_set = await asyncio.wait_for(seen.get(), DEADLINE)
        assert list(policy_set.rollouts) == ["a"]
        assert not task.done()
    assert any("callback failed" in r.getMessage() for r in caplog.records)


async def test_missing_directory_keeps_serving(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "a.yaml").write_text(policy("a"))
    watcher, recorder = make(directory)
    before = await watcher.load_once()
    async with running(watcher):
        (directory / "a.yaml").rename(tmp_path / "a.yaml")
        directory.rmdir()
        policy_set, errors = await recorder.next()
        assert policy_set.rollouts == before.rollouts
        assert [e.file for e in errors] == [str(directory)]


def test_a_swapped_in_file_with_the_same_size_and_mtime_is_a_change(tmp_path: Path) -> None:
    """git-sync swaps a symlink to a new checkout; a policy file there can have the old one's size and
    modification time (only the version's digit differs). Before, the fingerprint missed the swap."""
    for worktree, version in (("one", "v1"), ("two", "v2")):
        (tmp_path / worktree).mkdir()
        path = tmp_path / worktree / "shop.yaml"
        path.write_text(f"version: {version}\n")
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    (tmp_path / "current").symlink_to("one")
    before = watcher_module._fingerprint(tmp_path / "current")
    (tmp_path / "next").symlink_to("two")
    os.rename(tmp_path / "next", tmp_path / "current")
    assert watcher_module._fingerprint(tmp_path / "current") != before
