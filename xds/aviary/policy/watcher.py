"""Watch a policy directory and hand each new PolicySet to the control plane.

Polling rather than inotify: a stat of a handful of files per second costs nothing, works on every
filesystem (including ConfigMap volumes, whose symlink swaps inotify handles poorly), and makes the
watcher trivial to test. Parsing happens only when the fingerprint changes or on ``reload()``, and
in a worker process (``aviary.policy.workers``): a big policy set parsed in a thread still held the
GIL long enough to stall the event loop for hundreds of milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aviary.policy.loader import PolicyBook, is_policy_file_name, load_directory
from aviary.policy.schema import PolicyError, PolicySet
from aviary.policy.workers import PolicyWorkers, WorkerFailed

__all__ = ["DirectoryWatcher", "OnChange"]

logger = logging.getLogger("aviary.policy")

OnChange = Callable[[PolicySet, list[PolicyError]], Awaitable[None]]
Fingerprint = tuple[tuple[str, int, int, int], ...] | str


def _fingerprint(directory: Path) -> Fingerprint:
    """(name, inode, mtime_ns, size) of every policy file; an error string if the directory is unreadable.

    The inode tells a swapped-in file from the one it replaced even when both have the same size and
    modification time, as git-sync's checkout swaps can make them."""
    try:
        with os.scandir(directory) as entries:
            found = []
            for entry in entries:
                if not is_policy_file_name(entry.name):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    info = entry.stat()
                except OSError:
                    found.append((entry.name, -1, -1, -1))
                    continue
                found.append((entry.name, info.st_ino, info.st_mtime_ns, info.st_size))
    except OSError as exc:
        return f"unreadable: {exc}"
    return tuple(sorted(found))


class DirectoryWatcher:
    """Polls ``directory`` and awaits ``on_change`` whenever the serving set or the errors change.

    ``on_change`` is awaited from the ``run()`` task, so a slow callback delays the next poll rather
    than racing it. An exception from it is logged and the watcher keeps going: one failed publish
    must not stop later policy changes from arriving.
    """

    def __init__(self, directory: Path, on_change: OnChange, poll_interval: float = 1.0) -> None:
        self._directory = directory
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._book = PolicyBook()
        self._reload = asyncio.Event()
        self._fingerprint: Fingerprint | None = None
        self._errors: list[PolicyError] | None = None
        self._notified: PolicySet | None = None
        self._workers = PolicyWorkers(workers=1)

    @property
    def current(self) -> PolicySet:
        return self._book.current

    @property
    def errors(self) -> list[PolicyError]:
        """The problems of the latest load (empty when every file is valid)."""
        return list(self._errors or [])

    def reload(self) -> None:
        """Re-read the directory on the next loop turn even if nothing looks changed (SIGHUP)."""
        self._reload.set()

    async def load_once(self) -> PolicySet:
        """Load and apply synchronously with start-up; ``run()`` then reports only later changes.

        In a thread: before the plane listens there is nothing on the loop to starve, and starting
        a worker process would only delay the first proxy's configuration.
        """
        policy_set, errors = await self._load(in_worker=False)
        self._notified, self._errors = policy_set, errors
        return policy_set

    async def run(self) -> None:
        self._workers.reopen()  # run again after a crash: the last run closed them on its way out
        try:
            await self._poll()
        finally:  # cancelled at stop: the worker process goes too
            await asyncio.shield(self._workers.close())

    async def _poll(self) -> None:
        while True:
            forced = self._reload.is_set()
            self._reload.clear()
            if forced or _fingerprint(self._directory) != self._fingerprint:
                policy_set, errors = await self._load(in_worker=True)
                if self._changed(policy_set, errors):
                    self._notified, self._errors = policy_set, errors
                    try:
                        await self._on_change(policy_set, errors)
                    except Exception:
                        logger.exception("policy change callback failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), timeout=self._poll_interval)

    async def _load(self, in_worker: bool) -> tuple[PolicySet, list[PolicyError]]:
        # Fingerprint first: a write landing during the load changes it again and triggers a reload.
        self._fingerprint = _fingerprint(self._directory)
        result = None
        if in_worker:
            try:
                result = await self._workers.load_directory(self._directory)
            except WorkerFailed as exc:  # a thread, which holds the GIL at times, beats no load
                logger.warning("policy worker unavailable (%s); loading %s in a thread", exc, self._directory)
        if result is None:
            result = await asyncio.to_thread(load_directory, self._directory)
        policy_set, errors = self._book.apply(result)
        for error in errors:
            logger.warning("policy rejected: %s", error)
        return policy_set, errors

    def _changed(self, policy_set: PolicySet, errors: list[PolicyError]) -> bool:
        if self._notified is None or self._errors is None:
            return True
        return policy_set.rollouts != self._notified.rollouts or errors != self._errors
