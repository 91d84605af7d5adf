"""When each rollout next wants the engine: a heap, so the loop finds what is due without a scan.

The engine loop used to compute every rollout's next wake-up on every turn (one turn per event):
with 1,000 rollouts checked every second that is a million ``next_wakeup`` calls a second. Here a
rollout's time is computed again only when something it depends on changed (its status, its spec,
a back-off, a check round starting or ending): the runner marks it dirty, and the next read of the
schedule recomputes the dirty ones. Old heap entries are left in place and skipped when read (a
rollout's current time is the one in ``_when``), so an update is O(log R).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["WakeSchedule"]

WhenFor = Callable[[str], float | None]


class WakeSchedule:
    """``when(name)`` (None: nothing is time-driven) for the names marked dirty since the last read."""

    def __init__(self, when: WhenFor) -> None:
        self._when_for = when
        self._when: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._dirty: set[str] = set()

    def mark(self, name: str) -> None:
        """Something ``name``'s wake-up depends on changed (or it is gone): recompute it on the next read."""
        self._dirty.add(name)

    def _refresh(self) -> None:
        while self._dirty:
            name = self._dirty.pop()
            when = self._when_for(name)
            if when is None:
                self._when.pop(name, None)
                continue
            if self._when.get(name) == when:
                continue
            self._when[name] = when
            heapq.heappush(self._heap, (when, name))
        # Drop stale entries from the top, so that the first one is a live one.
        while self._heap and self._when.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if len(self._heap) > 4 * len(self._when) + 64:  # stale entries pile up below: rebuild
            self._heap = [(when, name) for name, when in self._when.items()]
            heapq.heapify(self._heap)

    def next_time(self) -> float | None:
        """The earliest wake-up of any rollout (None: none)."""
        self._refresh()
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[str]:
        """The rollouts whose wake-up is at or before ``now``, earliest first. They stay scheduled
        until marked: the caller marks each one it handles (its status or its checks change)."""
        self._refresh()
        found: list[str] = []
        seen: set[str] = set()
        for when, name in self._walk(now):
            if self._when.get(name) == when and name not in seen:
                seen.add(name)
                found.append(name)
        return found

    def _walk(self, now: float) -> list[tuple[float, str]]:
        """The heap's entries at or before ``now`` in order, without disturbing the heap (a
        breadth-first walk that only descends below entries that are due)."""
        out: list[tuple[float, str]] = []
        heap = self._heap
        frontier = [0] if heap else []
        while frontier:
            below: list[int] = []
            for index in frontier:
                entry = heap[index]
                if entry[0] > now:
                    continue
                out.append(entry)
                below.extend(child for child in (2 * index + 1, 2 * index + 2) if child < len(heap))
            frontier = below
        out.sort()
        return out

    def scheduled(self) -> dict[str, float]:
        """Every rollout's current wake-up (for tests and diagnostics)."""
        self._refresh()
        return dict(self._when)
