"""`make bench`: how fast Aviary builds snapshots and pushes a weight change to many proxies.

Numbers go to stdout and tests/bench/results.json. Not a pass/fail test.
  - snapshot build: 200 rollouts on one listener; cold (every resource encoded) and after one
    rollout's weight changed (only route configurations encoded again); median of 20
  - fan-out: one weight change -> every one of N Envoy-like streams ACKed the new route
    (N = 100 and 1,000 streams in a separate client process; median and p90 of 15 changes)
  - reaction through a real Envoy and Prometheus (tests/bench/reaction.py): a failing canary's first
    500 -> weight 0 at Envoy, and a healthy canary's write -> 100 % at Envoy (the README quotes these)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import (
    PublishedRollout,
    build_api_listener,
    build_cluster,
    build_grpc_route_configuration,
    build_listener,
    build_snapshot,
    cluster_name,
)
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan
from tests.bench.reaction import bench_reaction

REPO = Path(__file__).resolve().parents[2]
LISTENER = ListenerSpec(address="0.0.0.0", port=10000)
V1 = Backend("v1", (Endpoint.model_validate("10.0.0.1:8080"),))
V2 = Backend("v2", (Endpoint.model_validate("10.0.0.2:8080"),))


def bench_snapshot_build() -> dict[str, float]:
    rollouts = [
        PublishedRollout.of(f"svc-{i}", LISTENER, (f"svc-{i}.example.com",), ((V1, 90), (V2, 10)), (V1, V2))
        for i in range(200)
    ]
    cold, weight_change = [], []
    for i in range(20):
        for builder in (build_listener, build_api_listener, build_grpc_route_configuration, build_cluster):
            builder.cache_clear()
        start = time.perf_counter()
        snapshot = build_snapshot(rollouts)
        cold.append(time.perf_counter() - start)
        # One rollout's weight moves: only its route configurations are encoded again.
        changed = [*rollouts[:-1], replace(rollouts[-1], route=((cluster_name(rollouts[-1].name, "v1"), 80 - i),
                                                    (cluster_name(rollouts[-1].name, "v2"), 20 + i)))]
        start = time.perf_counter()
        build_snapshot(changed)
        weight_change.append(time.perf_counter() - start)
    route = snapshot.items("type.googleapis.com/envoy.config.route.v3.RouteConfiguration")["route-0.0.0.0-10000"]
    return {"rollouts": 200, "cold_median_ms": round(statistics.median(cold) * 1000, 2),
            "weight_change_median_ms": round(statistics.median(weight_change) * 1000, 2),
            "route_config_bytes": len(route.any_bytes)}


async def bench_fanout(streams: int, changes: int = 15) -> dict[str, float]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.set_rollout("checkout", Placement(LISTENER, ("*",)), TrafficPlan(V1, V2, 0))
    server, port = await start_xds_server("127.0.0.1:0", AggregatedDiscoveryService(cache, proxies.apply))
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.fanout_client", str(port), "--streams", str(streams),
        cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        line = await asyncio.wait_for(client.stdout.readline(), 300)
        assert line.strip() == b"ready", line
        acked = asyncio.Event()
        director.on_traffic_acked(lambda name, traffic: acked.set())
        times, cpu = [], []
        for change in range(1, changes + 1):
            acked.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            director.set_canary_weight("checkout", change)
            await asyncio.wait_for(acked.wait(), 120)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        client.stdin.close()
        await asyncio.wait_for(client.wait(), 60)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
        await server.stop(0)
    ordered = sorted(times)
    return {"streams": streams, "median_ms": round(statistics.median(times) * 1000, 1),
            "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 1),
            "server_cpu_ms_median": round(statistics.median(cpu) * 1000, 1)}


async def main() -> None:
    results = {"snapshot_build": bench_snapshot_build()}
    print("snapshot build:", results["snapshot_build"], flush=True)
    for streams in (100, 1000):
        result = await bench_fanout(streams)
        results[f"fanout_{streams}"] = result
        print(f"weight change -> all {streams} streams ACKed:", result, flush=True)
    results["reaction"] = await asyncio.to_thread(bench_reaction)
    print("reaction through real Envoy and Prometheus:", results["reaction"], flush=True)
    (REPO / "tests" / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
