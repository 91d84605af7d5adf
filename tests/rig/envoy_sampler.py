"""What Envoy itself routes, sampled over time: a thread reads /config_dump (and, optionally, some
counters from /stats) every ~50 ms and keeps timestamped samples.

Tests use it to assert on Envoy's own state rather than on the control plane's word: how long Envoy
served each weight, that a weight never went down, that Envoy took an update before some moment.
Each sample reads the counters first and the route second, so a sample whose route is X shows
counters that were reached no later than Envoy was routing X.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tests.rig.envoy import EnvoyProcess


@dataclass(frozen=True)
class EnvoySample:
    at: float  # time.time() once the route was read
    weights: dict[str, int]  # the rollout's virtual host: {cluster: weight}
    stats: dict[str, int]  # the counters matching the sampler's filter, read just before the route


class EnvoySampler:
    """``EnvoySampler(envoy, route, "shop", stats_filter=r"rds\\.route-.*\\.update_success$").start()``."""

    def __init__(
        self,
        envoy: EnvoyProcess,
        route: str,
        rollout: str,
        stats_filter: str | None = None,
        interval: float = 0.05,
    ) -> None:
        self.envoy = envoy
        self.route = route
        self.rollout = rollout
        self.stats_filter = stats_filter
        self.interval = interval
        self.samples: list[EnvoySample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="envoy-sampler", daemon=True)

    def _stats(self) -> dict[str, int]:
        if self.stats_filter is None:
            return {}
        data: dict[str, Any] = json.loads(
            self.envoy.admin_get(f"/stats?format=json&usedonly&filter={quote(self.stats_filter)}")
        )
        return {s["name"]: int(s["value"]) for s in data.get("stats", []) if isinstance(s.get("value"), int)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stats = self._stats()
                weights = self.envoy.route_weights(self.route).get(self.rollout, {})
                self.samples.append(EnvoySample(time.time(), weights, stats))
            except Exception:  # Envoy busy or restarting: a missed sample, counted
                self.errors += 1
            self._stop.wait(self.interval)

    def start(self) -> EnvoySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    # ---- reading the samples ---------------------------------------------------------------
    def weight_of(self, sample: EnvoySample, cluster: str) -> int:
        return sample.weights.get(cluster, 0)

    def changes(self, cluster: str, since: float = 0.0) -> list[tuple[float, int]]:
        """(seconds since ``since``, weight of ``cluster``) at each change of that weight."""
        out: list[tuple[float, int]] = []
        for sample in list(self.samples):
            weight = self.weight_of(sample, cluster)
            if not out or out[-1][1] != weight:
                out.append((round(sample.at - since, 3), weight))
        return out

    def decreases(self, cluster: str) -> list[tuple[int, int, float]]:
        """(from, to, at) for every sample where ``cluster``'s weight is lower than the one before."""
        pairs = itertools.pairwise(list(self.samples))
        return [
            (self.weight_of(a, cluster), self.weight_of(b, cluster), b.at)
            for a, b in pairs
            if self.weight_of(b, cluster) < self.weight_of(a, cluster)
        ]

    def first_at(self, cluster: str, weight: int, after: float = 0.0) -> float | None:
        """time.time() of the first sample after ``after`` in which ``cluster`` has ``weight``."""
        return next((s.at for s in list(self.samples) if s.at > after and self.weight_of(s, cluster) == weight), None)

    def span_at(self, cluster: str, weight: int) -> tuple[float, float] | None:
        """(first, last) sample time at which ``cluster`` had ``weight`` (None if never seen)."""
        times = [s.at for s in list(self.samples) if self.weight_of(s, cluster) == weight]
        return (times[0], times[-1]) if times else None

    def time_at(self, cluster: str, weight: int) -> float:
        """Seconds between the first and the last sample at ``weight`` (0 if never seen)."""
        span = self.span_at(cluster, weight)
        return span[1] - span[0] if span else 0.0
