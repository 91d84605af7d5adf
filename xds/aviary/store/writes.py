"""Whether the state file can be written now, from the latest attempt of each writer.

The writers are the rollout engine (one writer per rollout, named ``rollout <name>``) and the
state heartbeat (``heartbeat``). A write that fails (disk full, read-only file system) is retried
by its writer; this only keeps score, so that status, health and metrics all say the same thing:
the state counts as writable exactly when no writer's latest attempt failed.

It logs the file's transitions once each (unwritable, writable again), not every failed retry:
a disk that stays full for an hour must not fill the log as well.
"""

from __future__ import annotations

import logging

__all__ = ["StateWrites"]

log = logging.getLogger("aviary.state")


class StateWrites:
    def __init__(self) -> None:
        self._failing: dict[str, str] = {}  # writer -> the error of its latest attempt, oldest first
        self.errors_total = 0  # every failed write, retries included (a counter for /metrics)

    def failed(self, writer: str, error: str) -> bool:
        """Record a failed write; True when this writer was not failing with this error already
        (its caller logs that once)."""
        self.errors_total += 1
        if not self._failing:
            log.error("%s; rollbacks still reach the proxies, steps away from stable wait; retrying", error)
        new = self._failing.get(writer) != error
        self._failing[writer] = error
        return new

    def succeeded(self, writer: str) -> bool:
        """Record a successful write; True when this writer had been failing (its caller logs the
        recovery)."""
        if self._failing.pop(writer, None) is None:
            return False
        if not self._failing:
            log.info("the state file can be written again")
        return True

    def forget(self, writer: str) -> None:
        """A writer that is gone (a pruned rollout) no longer counts."""
        self.succeeded(writer)

    def error(self, writer: str) -> str | None:
        """Why this writer's latest attempt failed; None when it succeeded."""
        return self._failing.get(writer)

    def failing(self) -> list[str]:
        """The writers whose latest attempt failed, in the order they started failing."""
        return list(self._failing)

    @property
    def writable(self) -> bool:
        return not self._failing

    @property
    def state_error(self) -> str | None:
        """The error of the writer that started failing last (of those still failing); None when the
        state is writable."""
        return next(reversed(self._failing.values()), None)
