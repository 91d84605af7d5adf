"""SotW against delta through real gRPC: the same changes at N streams, interleaved in one run.

Two `aviary serve` processes (tests/bench/fanout.py's `aviary_server`: same flags, same policies,
``ROLLOUTS`` rollouts on one listener, settled to a v2 canary at 10 %) run side by side: one serves N
SotW streams (``StreamAggregatedResources``), the other N delta streams (``DeltaAggregatedResources``),
from the fan-out client processes (tests/bench/fanout_client.py, ``--protocol``). The changes
alternate between them, change by change, in ABBA order (SotW first on odd changes, delta first on
even ones), so that the machine's load drifts into both columns alike:

- ``weight``: the admin API's SetWeight on one running canary (a route change: RDS only);
- ``new canary``: one rollout left at v1 without a canary gets a v2 policy file, then SIGHUP (the
  server reads its directory at once): a cluster and its endpoints appear, then the route moves
  (CDS, EDS, then RDS once the clusters are ACKed: make-before-break).

A change is timed from just before it is triggered to the moment the last stream received the new
route version (the clients' wall clocks). Bytes are what each stream received from one change to the
next one of its server (so what came after the route is counted too), on the wire, per stream.
Server CPU is the process tree's, from /proc; client CPU and the busiest client process's share of
one core show the clients are not the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.bare_server import rollout_name
from tests.bench.fanout import ROLLOUTS, LineProcess, Server, aviary_server, clients, percentile, write_policies
from tests.bench.fanout_client import raise_fd_limit
from tests.bench.procstat import cpu_seconds, rss_bytes

PROTOCOLS = ("sotw", "delta")


@dataclass
class Fleet:
    """One protocol's server and its client processes, and what its changes measured."""

    protocol: str
    server: Server
    procs: list[LineProcess]
    served: int = 0
    rss_per_stream_kb: float = 0.0
    first_route_all_s: float = 0.0
    rows: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # change kind -> one row per change
    _open: dict[str, float] | None = None  # the last change's row, until its late bytes are counted

    async def connect(self) -> None:
        pids = self.server.pids()
        rss_before = rss_bytes(pids)
        start = time.time()
        for proc in self.procs:
            proc.send("connect")
        ready = [await proc.expect("ready", 600) for proc in self.procs]
        self.served = sum(int(r[0]) for r in ready)
        self.first_route_all_s = max(float(r[1]) for r in ready) - start
        self.rss_per_stream_kb = (rss_bytes(self.server.pids()) - rss_before) / max(self.served, 1) / 1024

    async def close_open_row(self) -> None:
        """Bytes of the last change, counted now: what arrived after its route came too."""
        if self._open is None:
            return
        for proc in self.procs:
            proc.send("count")
        counts = [await proc.expect("count", 60) for proc in self.procs]
        self._open["bytes_per_stream"] = sum(int(c[0]) for c in counts) / max(self.served, 1)
        self._open["max_bytes_per_stream"] = max(int(c[1]) for c in counts)
        self._open = None

    async def change(self, kind: str, trigger: Callable[[], Awaitable[None]]) -> None:
        await self.close_open_row()
        for proc in self.procs:
            proc.send("mark")
        for proc in self.procs:
            await proc.expect("marked", 60)
        pids = self.server.pids()
        cpu0 = cpu_seconds(pids)
        t0 = time.time()
        await trigger()
        done = [await proc.expect("changed", 300) for proc in self.procs]
        reached = sum(int(d[0]) for d in done)
        if reached < self.served:
            raise RuntimeError(f"{self.protocol}: {kind} reached {reached}/{self.served} streams")
        elapsed = max(float(d[1]) for d in done) - t0
        row = {
            "ms": elapsed * 1000,
            "server_cpu_ms": (cpu_seconds(pids) - cpu0) * 1000,
            "client_cpu_ms": sum(float(d[3]) for d in done) * 1000,
            "client_busiest_share": max(float(d[3]) for d in done) / max(elapsed, 1e-6),
            "bytes_per_stream": sum(int(d[4]) for d in done) / max(self.served, 1),
            "max_bytes_per_stream": max(int(d[5]) for d in done),
        }
        self.rows.setdefault(kind, []).append(row)
        self._open = row

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "protocol": self.protocol, "processes": self.server.processes, "clients_served": self.served,
            "client_processes": len(self.procs), "time_to_first_route_all_s": round(self.first_route_all_s, 3),
            "rss_kb_per_stream": round(self.rss_per_stream_kb, 1),
        }  # fmt: skip
        for kind, rows in self.rows.items():
            ms = [r["ms"] for r in rows]
            out[kind] = {
                "changes": len(rows),
                "change_ms": {"p50": round(statistics.median(ms), 1), "p99": round(percentile(ms, 99), 1),
                              "max": round(max(ms), 1)},
                "bytes_per_stream": round(statistics.median(r["bytes_per_stream"] for r in rows)),
                "max_bytes_per_stream": max(round(r["max_bytes_per_stream"]) for r in rows),
                # the mean: /proc counts CPU in 10 ms ticks
                "server_cpu_ms_per_change": round(statistics.mean(r["server_cpu_ms"] for r in rows), 1),
                "client_cpu_ms_per_change": round(statistics.median(r["client_cpu_ms"] for r in rows), 1),
                "client_busiest_process_cpu_share": round(max(r["client_busiest_share"] for r in rows), 2),
            }  # fmt: skip
        return out


def _set_weight(server: Server, weight: int) -> Callable[[], Awaitable[None]]:
    async def trigger() -> None:
        await server.extra["admin"].set_weight(rollout_name(0), weight)

    return trigger


def _new_canary(server: Server, index: int) -> Callable[[], Awaitable[None]]:
    async def trigger() -> None:
        write_policies(server.extra["policies"], range(index, index + 1), "v2")
        os.kill(server.extra["pid"], signal.SIGHUP)  # read the directory now, not at the next poll

    return trigger


def ratios(sotw: dict[str, Any], delta: dict[str, Any]) -> dict[str, float | None]:
    """delta / SotW for one change kind (None where SotW's figure is 0)."""

    def r(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "bytes_per_stream": r(delta["bytes_per_stream"], sotw["bytes_per_stream"]),
        "change_p50": r(delta["change_ms"]["p50"], sotw["change_ms"]["p50"]),
        "change_p99": r(delta["change_ms"]["p99"], sotw["change_ms"]["p99"]),
        "server_cpu_per_change": r(delta["server_cpu_ms_per_change"], sotw["server_cpu_ms_per_change"]),
    }


async def bench_protocols(streams: int, changes: int, workers: int, canaries: int | None = None) -> dict[str, Any]:
    """``changes`` weight changes and ``canaries`` new canaries (default changes // 4, at least 1) per
    protocol at ``streams`` streams each, interleaved."""
    canaries = canaries if canaries is not None else max(1, changes // 4)
    out: dict[str, Any] = {"streams": streams, "workers": workers, "rollouts": ROLLOUTS}
    with tempfile.TemporaryDirectory(prefix=f"aviary-delta-{streams}-") as tmp:
        base = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            fleets: dict[str, Fleet] = {}
            for protocol in PROTOCOLS:
                work = base / protocol
                work.mkdir()
                server = await stack.enter_async_context(aviary_server(workers, work, stable_left=canaries))
                procs = await stack.enter_async_context(clients(server.port, streams, work, ("--protocol", protocol)))
                fleets[protocol] = Fleet(protocol, server, procs)
            for fleet in fleets.values():  # one after the other: each connects on a quiet server
                await fleet.connect()
            await asyncio.gather(*(fleet.server.settle() for fleet in fleets.values()))
            for k in range(1, changes + 1):
                for protocol in PROTOCOLS if k % 2 else reversed(PROTOCOLS):
                    await fleets[protocol].change("weight", _set_weight(fleets[protocol].server, 10 + k))
            for j in range(canaries):
                for protocol in PROTOCOLS if j % 2 == 0 else reversed(PROTOCOLS):
                    fleet = fleets[protocol]
                    await fleet.change("new canary", _new_canary(fleet.server, ROLLOUTS - canaries + j))
            for fleet in fleets.values():
                await fleet.close_open_row()
            for protocol, fleet in fleets.items():
                out[protocol] = fleet.summary()
    out["delta_over_sotw"] = {
        kind: ratios(out["sotw"][kind], out["delta"][kind]) for kind in ("weight", "new canary")
    }
    return out


def main() -> None:
    """``python -m tests.bench.fanout_delta [N] [CHANGES] [WORKERS]``: one run, printed as JSON."""
    raise_fd_limit()
    n, changes, workers = (int(a) for a in [*sys.argv[1:], "1000", "10", "2"][:3])
    print(json.dumps(asyncio.run(bench_protocols(n, changes, workers)), indent=1))


if __name__ == "__main__":
    main()
