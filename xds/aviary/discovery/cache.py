"""Holds the current snapshot of each proxy group and wakes the streams that it changed for.

The cache owns resources; the streams own protocol state (nonces, subscriptions, what they
sent). They meet at two calls: `snapshot_for(node_cluster)` and a `Watch` whose `wake`
callback the cache calls when that group's snapshot changed.

Groups: rollouts with `proxyCluster: X` are served only to proxies whose node.cluster is X.
Each distinct X has a snapshot; proxies whose cluster names no group get the default group
(key ""), which holds the rollouts without `proxyCluster`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from aviary.discovery.snapshot import EMPTY, Snapshot

DEFAULT_GROUP = ""


@dataclass(eq=False, slots=True)
class Watch:
    node_cluster: str
    wake: Callable[[], None]


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: Mapping[str, Snapshot] = MappingProxyType({DEFAULT_GROUP: EMPTY})
        self._watches: set[Watch] = set()
        self._listeners: list[Callable[[], None]] = []
        self.generation = 0

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every publish that changed something (the xDS workers' feed)."""
        self._listeners.append(listener)

    def group_of(self, node_cluster: str) -> str:
        return node_cluster if node_cluster in self._snapshots else DEFAULT_GROUP

    def snapshot_for(self, node_cluster: str) -> Snapshot:
        return self._snapshots[self.group_of(node_cluster)]

    @property
    def snapshots(self) -> Mapping[str, Snapshot]:
        return self._snapshots

    def publish(self, snapshots: Mapping[str, Snapshot]) -> bool:
        """Replace all groups at once; wake only streams whose snapshot is not equivalent.

        Returns whether anything changed. A snapshot with dangling references is refused:
        it would make Envoy route to clusters it does not have.
        """
        for group, snapshot in snapshots.items():
            problems = snapshot.inconsistencies()
            if problems:
                raise ValueError(f"inconsistent snapshot for group {group!r}: {'; '.join(problems)}")
        new = dict(snapshots)
        new.setdefault(DEFAULT_GROUP, EMPTY)
        old = self._snapshots
        changed = new.keys() != old.keys() or any(not new[g].equivalent(old[g]) for g in new)
        if not changed:
            return False
        self._snapshots = MappingProxyType(new)
        self.generation += 1
        changed_for: dict[str, bool] = {}  # node cluster -> did its snapshot change; once per cluster
        for watch in list(self._watches):
            cluster = watch.node_cluster
            if cluster not in changed_for:
                before = old[cluster if cluster in old else DEFAULT_GROUP]
                changed_for[cluster] = not self.snapshot_for(cluster).equivalent(before)
            if changed_for[cluster]:
                watch.wake()
        for listener in self._listeners:
            listener()
        return True

    def watch(self, node_cluster: str, wake: Callable[[], None]) -> Watch:
        watch = Watch(node_cluster, wake)
        self._watches.add(watch)
        return watch

    def cancel(self, watch: Watch) -> None:
        self._watches.discard(watch)

    @property
    def watch_count(self) -> int:
        return len(self._watches)
