"""A ``ReportSink`` for a stream worker: reports go to the engine process, batched.

Reports decoded during one turn of the worker's event loop leave as one frame
(``worker_protocol.reports_message``), so 1,000 proxies flushing every second cost the engine
a few frames per second per worker, not a thousand calls; the engine feeds them to its one store
(``aviary.metrics.envoy_reports``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

__all__ = ["Batch", "ReportForwarder"]

Batch = tuple[tuple[tuple[str, str, tuple[tuple[str, int, float], ...]], ...],
              tuple[tuple[str, str, tuple[tuple[str, float, int], ...]], ...]]
"""(counters, samples): ((node id, node cluster, items), ...) each, in arrival order."""


class ReportForwarder:
    """Collects reports during one loop turn and hands them to ``send`` as one ``Batch``."""

    def __init__(self, send: Callable[[Batch], None]) -> None:
        self._send = send
        self._counters: list[tuple[str, str, tuple[tuple[str, int, float], ...]]] = []
        self._samples: list[tuple[str, str, tuple[tuple[str, float, int], ...]]] = []

    def _schedule(self) -> None:
        if not self._counters and not self._samples:
            asyncio.get_running_loop().call_soon(self._flush)

    def add_counters(self, node_id: str, node_cluster: str, counts: Iterable[tuple[str, int, float]]) -> None:
        self._schedule()
        self._counters.append((node_id, node_cluster, tuple(counts)))

    def add_samples(self, node_id: str, node_cluster: str, samples: Iterable[tuple[str, float, int]]) -> None:
        items = tuple(samples)
        if not items:
            return
        self._schedule()
        self._samples.append((node_id, node_cluster, items))

    def _flush(self) -> None:
        batch = (tuple(self._counters), tuple(self._samples))
        self._counters, self._samples = [], []
        if batch[0] or batch[1]:
            self._send(batch)
