"""What the proxies reported about themselves (metrics service sink, gRPC access logs), bounded.

The engine process holds one ``EnvoyReports``; the ingest services (``aviary.reports.ingest``)
feed it, directly or through the stream workers, and the ``envoy`` metrics provider
(``aviary.metrics.envoy``) reads it. Everything is stamped with the engine's clock when it
arrives (a report is about the flush interval just past), so windows are measured on the same
clock as the check rounds.

Memory is bounded whatever the proxies send:

- counters: per cluster a ring of time slots (``SLOT_SECONDS`` each) over the last ``horizon``
  seconds, each slot the requests answered by response code class 1xx..5xx, summed over proxies;
- samples: per cluster the last ``max_samples`` access-log entries (time, duration ms, status),
  at most ``samples_per_second`` kept per cluster and second (the rest are counted as dropped;
  ``keep`` sets a cluster's own budget: the policy's ``analysis.samplesPerSecond``). Envoy already
  sends about that many (its access log's token buckets, ``aviary.discovery.resources``): this cap
  is the second line, for proxies without the filter (per-type services), several proxies of one
  cluster, and Envoy's seconds not being ours;
- at most ``max_clusters`` clusters (the least recently reported one is forgotten first) and
  ``max_proxies`` proxies.

Counters must arrive as deltas (``report_counters_as_deltas: true`` in the sink), which is what
Envoy then sends for every counter that changed since its last flush.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CLASSES",
    "DEFAULT_HORIZON",
    "SLOT_SECONDS",
    "Counts",
    "EnvoyReports",
    "ProxyReport",
    "percentile",
]

CLASSES = 5
"""Response code classes 1xx..5xx (index 0..4)."""
SLOT_SECONDS = 0.25
"""Granularity of the counter ring: a window is measured to within a quarter of a second."""
DEFAULT_HORIZON = 900.0
"""Seconds of counters and samples kept: the longest window the ``envoy`` provider answers."""
DEFAULT_MAX_SAMPLES = 20_000
DEFAULT_SAMPLES_PER_SECOND = 100  # analysis.samplesPerSecond's default, for clusters no check asked about yet
DEFAULT_MAX_CLUSTERS = 2_000
DEFAULT_MAX_PROXIES = 100_000


@dataclass(frozen=True, slots=True)
class Counts:
    """Requests answered within a window, by response code class (index 0: 1xx ... 4: 5xx)."""

    by_class: tuple[float, ...] = (0.0,) * CLASSES

    @property
    def total(self) -> float:
        return sum(self.by_class)

    def of_class(self, code_class: int) -> float:
        return self.by_class[code_class - 1]


@dataclass(slots=True)
class ProxyReport:
    """When a proxy (node id) last reported, and what."""

    node_id: str
    node_cluster: str = ""
    metrics_at: float | None = None
    samples_at: float | None = None
    metrics_messages: int = 0
    samples: int = 0


@dataclass(slots=True)
class _Cluster:
    slots: deque[list[float]] = field(default_factory=deque)  # [slot number, 1xx, ..., 5xx], oldest first
    samples: deque[tuple[float, float, int]] = field(default_factory=deque)  # (at, duration ms, status)
    second: int = -1  # the second the sample budget counts for
    budget: int = 0
    dropped: int = 0
    received: int = 0  # entries that arrived, kept or dropped: what the proxies' own sampling let through


def percentile(values: list[float], quantile: float) -> float:
    """The ``quantile`` of ``values`` (sorted), interpolated linearly between the closest ranks; NaN when empty."""
    if not values:
        return math.nan
    position = quantile * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


class EnvoyReports:
    """The bounded store of what proxies reported (see the module docstring)."""

    def __init__(self, clock: Callable[[], float], *, horizon: float = DEFAULT_HORIZON,
                 max_samples: int = DEFAULT_MAX_SAMPLES, samples_per_second: int = DEFAULT_SAMPLES_PER_SECOND,
                 max_clusters: int = DEFAULT_MAX_CLUSTERS, max_proxies: int = DEFAULT_MAX_PROXIES) -> None:
        self._clock = clock
        self.horizon = horizon
        self._max_samples = max_samples
        self.samples_per_second = samples_per_second
        self._max_clusters = max_clusters
        self._max_proxies = max_proxies
        self._clusters: OrderedDict[str, _Cluster] = OrderedDict()  # least recently reported first
        self._budgets: dict[str, int] = {}  # cluster -> samples kept per second, when not the default
        self._proxies: OrderedDict[str, ProxyReport] = OrderedDict()
        self.metrics_messages = 0  # received in all (aviary_envoy_reports_total)
        self.samples_received = 0

    # ---- writes ---------------------------------------------------------------------------

    def _proxy(self, node_id: str, node_cluster: str) -> ProxyReport:
        proxy = self._proxies.get(node_id)
        if proxy is None:
            proxy = self._proxies[node_id] = ProxyReport(node_id, node_cluster)
            if len(self._proxies) > self._max_proxies:
                self._proxies.popitem(last=False)
        else:
            self._proxies.move_to_end(node_id)
            if node_cluster:
                proxy.node_cluster = node_cluster
        return proxy

    def _cluster(self, name: str) -> _Cluster:
        cluster = self._clusters.get(name)
        if cluster is None:
            cluster = self._clusters[name] = _Cluster()
            if len(self._clusters) > self._max_clusters:
                self._clusters.popitem(last=False)
        else:
            self._clusters.move_to_end(name)
        return cluster

    def add_counters(self, node_id: str, node_cluster: str, counts: Iterable[tuple[str, int, float]]) -> None:
        """One metrics report of ``node_id``: (cluster, code class 1..5, requests since its last report)."""
        now = self._clock()
        proxy = self._proxy(node_id, node_cluster)
        proxy.metrics_at = now
        proxy.metrics_messages += 1
        self.metrics_messages += 1
        slot = math.floor(now / SLOT_SECONDS)
        oldest = slot - math.ceil(self.horizon / SLOT_SECONDS)
        for name, code_class, delta in counts:
            if not 1 <= code_class <= CLASSES or not delta > 0 or not math.isfinite(delta):
                continue
            slots = self._cluster(name).slots
            if not slots or slots[-1][0] != slot:
                slots.append([float(slot)] + [0.0] * CLASSES)
                while slots[0][0] < oldest:
                    slots.popleft()
            slots[-1][code_class] += delta

    def add_samples(self, node_id: str, node_cluster: str, samples: Iterable[tuple[str, float, int]]) -> None:
        """Access-log entries of ``node_id``: (cluster, duration ms, HTTP status, 0 if none)."""
        now = self._clock()
        proxy = self._proxy(node_id, node_cluster)
        proxy.samples_at = now
        second = math.floor(now)
        for name, duration_ms, status in samples:
            proxy.samples += 1
            self.samples_received += 1
            cluster = self._cluster(name)
            cluster.received += 1
            if cluster.second != second:
                cluster.second, cluster.budget = second, self._budgets.get(name, self.samples_per_second)
            if cluster.budget <= 0:
                cluster.dropped += 1
                continue
            cluster.budget -= 1
            cluster.samples.append((now, duration_ms, status))
            if len(cluster.samples) > self._max_samples:
                cluster.samples.popleft()

    def keep(self, cluster: str, per_second: int) -> None:
        """Keep at most ``per_second`` samples per second of ``cluster`` from now on."""
        if len(self._budgets) >= self._max_clusters and cluster not in self._budgets:
            self._budgets.pop(next(iter(self._budgets)))
        self._budgets[cluster] = per_second

    # ---- reads ----------------------------------------------------------------------------

    def counts(self, cluster: str, start: float, end: float) -> Counts:
        """Requests of ``cluster`` reported in (start, end], summed over every proxy."""
        return self.count_series(cluster, (start, end))[0]

    def count_series(self, cluster: str, edges: Sequence[float]) -> list[Counts]:
        """Requests of ``cluster`` in each interval (edges[i], edges[i + 1]] (edges ascending), in
        one pass back from the newest slot: a judge's series over the whole horizon stays cheap."""
        totals = [[0.0] * CLASSES for _ in range(len(edges) - 1)]
        entry = self._clusters.get(cluster)
        slots = [math.floor(edge / SLOT_SECONDS) for edge in edges]
        interval = len(totals) - 1
        for slot in reversed(entry.slots) if entry is not None else ():
            while interval >= 0 and slot[0] <= slots[interval]:
                interval -= 1
            if interval < 0:
                break
            if slot[0] <= slots[interval + 1]:
                bucket = totals[interval]
                for index in range(CLASSES):
                    bucket[index] += slot[index + 1]
        return [Counts(tuple(bucket)) for bucket in totals]

    def durations(self, cluster: str, start: float, end: float) -> list[float]:
        """Durations (ms) of the sampled requests of ``cluster`` that arrived in (start, end], sorted."""
        return self.duration_series(cluster, (start, end))[0]

    def duration_series(self, cluster: str, edges: Sequence[float]) -> list[list[float]]:
        """``durations`` for each interval (edges[i], edges[i + 1]], in one pass back from the newest sample."""
        out: list[list[float]] = [[] for _ in range(len(edges) - 1)]
        entry = self._clusters.get(cluster)
        interval = len(out) - 1
        for at, millis, _ in reversed(entry.samples) if entry is not None else ():
            while interval >= 0 and at <= edges[interval]:
                interval -= 1
            if interval < 0:
                break
            if at <= edges[interval + 1]:
                out[interval].append(millis)
        for values in out:
            values.sort()
        return out

    def dropped_samples(self, cluster: str) -> int:
        entry = self._clusters.get(cluster)
        return entry.dropped if entry is not None else 0

    def received_samples(self, cluster: str) -> int:
        """Entries of ``cluster`` that arrived, before the cap: Envoy's own sampling at work."""
        entry = self._clusters.get(cluster)
        return entry.received if entry is not None else 0

    def proxies(self) -> list[ProxyReport]:
        """Every proxy that reported, most recent last."""
        return list(self._proxies.values())

    def proxy(self, node_id: str) -> ProxyReport | None:
        return self._proxies.get(node_id)

    def now(self) -> float:
        return self._clock()
