"""One process per state file: an exclusive ``flock`` on a lock file next to it, held for life.

Two ``aviary serve`` on one state file both decide and both write: the second one advances the
first one's canaries on time alone, overwrites the saved proxy list, and ``--reset-state`` deletes
the database under a running process. So the state is locked before anything reads, writes or
resets it, and a second process is refused with the holder's PID.

Why ``flock`` on a separate ``<file>.lock``: the kernel drops the lock when the holder dies (even
``kill -9``), so there is no stale lock to clean up; SQLite's own locks last one transaction only;
and the lock file outlives ``--reset-state``, which deletes the database itself. The lock file is
never deleted: unlinking it would let a third process lock a new file while the second still holds
the old inode.

The descriptor is opened close-on-exec, so subprocesses started with ``exec`` (git, the policy
validation workers) do not inherit the lock; a bare ``fork()`` would, and Aviary does not fork.

Exceptions::

    LockError           the lock file cannot be created or opened (the OS error says why)
    └── LockHeld        another process holds the lock; ``pid`` is the holder's, if it wrote it
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import weakref
from pathlib import Path

__all__ = ["LockError", "LockHeld", "ProcessLock", "lock_path_for"]

_PID_READ_SECONDS = 0.2  # a holder writes its PID right after locking; wait that long for it


class LockError(Exception):
    """The lock file cannot be used; ``path`` is what it guards, ``reason`` the OS error."""

    def __init__(self, path: Path, lock_file: Path, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{path}: cannot open lock file {lock_file}: {reason}")
        self.path = path
        self.lock_file = lock_file
        self.reason = reason


class LockHeld(LockError):
    """Another process holds the lock of ``path``; ``pid`` is the holder's (None if unknown)."""

    def __init__(self, path: Path, lock_file: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(path, lock_file, f"held by {holder}", f"{path} is in use by another process ({holder})")
        self.pid = pid
        self.holder = holder


def lock_path_for(path: Path) -> Path:
    """``state.db`` -> ``state.db.lock``, in the same directory."""
    return path.with_name(path.name + ".lock")


def _read_pid(fd: int) -> int | None:
    deadline = time.monotonic() + _PID_READ_SECONDS
    while True:
        with contextlib.suppress(OSError, ValueError):
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text:
                return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


class ProcessLock:
    """An exclusive, non-blocking ``flock`` on ``lock_path_for(path)``; ``release()`` or exit frees it.

    ``path`` is what the lock guards (a state file, a directory); its parent directory is created
    if missing, as the guarded file would be created there anyway.
    """

    def __init__(self, path: Path, lock_file: Path | None = None) -> None:
        self.path = path
        self.lock_file = lock_file if lock_file is not None else lock_path_for(path)
        self._fd: int | None = None

    @classmethod
    def acquire(cls, path: Path, lock_file: Path | None = None) -> ProcessLock:
        """Take the lock now or raise: ``LockHeld`` (another process has it) or ``LockError``."""
        lock = cls(path, lock_file)
        lock._acquire()
        return lock

    def _acquire(self) -> None:
        try:
            with contextlib.suppress(FileExistsError):  # a file in the way: os.open says "Not a directory"
                self.lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LockError(self.path, self.lock_file, exc.strerror or str(exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeld(self.path, self.lock_file, pid) from None
        except OSError as exc:  # e.g. a filesystem without flock support
            os.close(fd)
            raise LockError(self.path, self.lock_file, exc.strerror or str(exc)) from exc
        # Ours now: say who holds it, for the refusal message of the next one.
        with contextlib.suppress(OSError):  # the PID is a courtesy; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # A lock whose owner is garbage-collected without release() must not stay held until exit.
        self._close = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the lock (idempotent). The file stays, emptied: see the module docstring."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        self._close()  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
