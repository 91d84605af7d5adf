"""Server memory per ADS stream, and how many of N streams get their first route in time.

    python -m tests.bench.stream_memory memory --streams 1000 3000        (from the repository root)
    python -m tests.bench.stream_memory memory --server bare --streams 1000
    python -m tests.bench.stream_memory first-route --streams 5000 --procs 3 --timeout 180

The server runs in this process with a realistic snapshot (100 rollouts on one listener: 200
clusters, 200 load assignments, one listener, one route configuration); the Envoy-like clients of
`tests.bench.fanout_client` run in `--procs` separate processes. `--server aviary` is the real ADS
service; `--server bare` is a grpc.aio server that writes the same pre-serialized responses, one
per type, and keeps no state per stream: the floor that grpc and asyncio cost.

memory: RSS after every stream has its first route minus RSS before any connected, divided by
N (`--trace` also prints the Python allocations still held per stream, by line). Each N runs in a
process of its own: RSS is not given back between runs.
first-route: how many streams have their first route after each 10 s, when all did (p50 and max
per client process), the CPU seconds the server and the client processes used, and the streams
the server ended, by status code (the clients retry them after 1 s, as Envoy does; fanout_client
does not, so one reset there is a proxy that never gets a route). `--channels N` sets connections
per client process: 16 by default, `--channels 10000` gives every stream its own, as Envoys have.
Then five weight changes: the time until all N ACKed, the server CPU, and the longest the event
loop ran nothing else (what a new stream waits at worst while one push goes to N streams).
Each result line carries the load average, since other work may share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls, wire
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import ADS_SERVICE, MAX_PENDING_STREAMS, AggregatedDiscoveryService, start_xds_server
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan

REPO = Path(__file__).resolve().parents[2]
LISTENER = ListenerSpec(address="0.0.0.0", port=10000)
V1 = Backend("v1", (Endpoint.model_validate("10.0.0.1:8080"),))
V2 = Backend("v2", (Endpoint.model_validate("10.0.0.2:8080"),))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_seconds(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def plane(rollouts: int) -> tuple[SnapshotCache, ProxyStatus, TrafficDirector]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    with director.batch():
        for i in range(rollouts):
            placement = Placement(LISTENER, (f"svc-{i}.example.com",))
            director.set_rollout(f"svc-{i}", placement, TrafficPlan(V1, V2, 10))
    return cache, proxies, director


class BareAds:
    """Answers the first request of each type with that type's pre-serialized response; nothing else."""

    def __init__(self, cache: SnapshotCache) -> None:
        snapshot = cache.snapshot_for("edge")
        self.responses = {
            t: wire.discovery_response(
                snapshot.type_versions[t], t, "1", (r.entry for _, r in sorted(snapshot.items(t).items()))
            )
            for t in typeurls.PUSH_ORDER
        }

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        async for request in requests:
            if not request.response_nonce and request.type_url in self.responses:
                await context.write(self.responses[request.type_url])

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=lambda data: data,
        )
        return grpc.method_handlers_generic_handler(ADS_SERVICE, {"StreamAggregatedResources": method})


async def start(kind: str, cache: SnapshotCache, proxies: ProxyStatus) -> tuple[grpc.aio.Server, int]:
    if kind == "aviary":
        return await start_xds_server("127.0.0.1:0", AggregatedDiscoveryService(cache, proxies.apply))
    server = grpc.aio.server(
        options=[  # Aviary's call queue, or past 1,000 queued stream starts grpc resets some at random
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", MAX_PENDING_STREAMS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_STREAMS),
        ]
    )
    server.add_generic_rpc_handlers((BareAds(cache).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def clients(port: int, streams: int, procs: int, channels: int = 16) -> list[asyncio.subprocess.Process]:
    out = []
    for p in range(procs):
        count = streams // procs + (1 if p < streams % procs else 0)
        out.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bench.stream_memory", "client", str(port),
                "--streams", str(count), "--first-index", str(p * (streams // procs + 1)),
                "--channels", str(min(channels, count)),
                cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        )
    return out


async def stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


async def measure_memory(kind: str, streams: int, procs: int, rollouts: int, trace: bool) -> dict[str, object]:
    cache, proxies, _director = plane(rollouts)
    server, port = await start(kind, cache, proxies)
    await asyncio.sleep(1)
    before = settled_rss()
    if trace:
        tracemalloc.start(1)
        traced_before = tracemalloc.take_snapshot()
    started = time.perf_counter()
    children = await clients(port, streams, procs)
    try:
        for proc in children:
            assert proc.stdout is not None
            while (line := await asyncio.wait_for(proc.stdout.readline(), 600)).split()[:1] != [b"ready"]:
                assert line, "a client process ended before all its streams had a route"
        took = time.perf_counter() - started
        await asyncio.sleep(3)
        after = settled_rss()
        result: dict[str, object] = {
            "server": kind, "streams": streams, "rollouts": rollouts,
            "rss_before_mb": round(before / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
            "kb_per_stream": round((after - before) / streams / 1024, 1),
            "all_routed_s": round(took, 1), "loadavg": loadavg(),
        }  # fmt: skip
        if trace:
            stats = tracemalloc.take_snapshot().compare_to(traced_before, "lineno")
            tracemalloc.stop()
            result["python_kb_per_stream"] = round(sum(s.size_diff for s in stats) / streams / 1024, 1)
            for stat in stats[:25]:
                frame = stat.traceback[0]
                print(f"  {stat.size_diff / streams:8.0f} B/stream {stat.count_diff / streams:6.1f} blocks/stream"
                      f"  {frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}", flush=True)
        return result
    finally:
        await stop(children)
        await server.stop(0)


async def measure_first_route(
    kind: str, streams: int, procs: int, rollouts: int, timeout: float, channels: int
) -> dict[str, object]:
    cache, proxies, director = plane(rollouts)
    server, port = await start(kind, cache, proxies)
    load_start = loadavg()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    children = await clients(port, streams, procs, channels)
    routed = [0] * len(children)
    done_at: list[float | None] = [None] * len(children)
    errors = [""] * len(children)

    async def follow(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            word, *rest = line.decode().split()
            if word == "routed":
                routed[i], errors[i] = int(rest[0]), rest[1]
            elif word == "ready":
                routed[i], errors[i] = int(rest[0]), " ".join(rest[1:])
                done_at[i] = time.perf_counter() - started
                return

    followers = [asyncio.create_task(follow(i, p)) for i, p in enumerate(children)]
    progress = []
    try:
        while time.perf_counter() - started < timeout and not all(f.done() for f in followers):
            await asyncio.sleep(10)
            client_cpu = sum(cpu_seconds(p.pid) for p in children)
            progress.append((round(time.perf_counter() - started), sum(routed), round(cpu_seconds() - cpu_started, 1),
                             round(client_cpu, 1)))
            print(f"  t={progress[-1][0]}s routed={progress[-1][1]} server_cpu={progress[-1][2]}s "
                  f"clients_cpu={progress[-1][3]}s rss={rss_bytes() // 2**20}MB load={loadavg()} "
                  f"ended_streams={errors}", flush=True)
        finished = [t for t in done_at if t is not None]
        pushes = await measure_pushes(director, streams) if kind == "aviary" and len(finished) == len(children) else {}
        return {
            "server": kind, "streams": streams, "client_procs": procs, "channels_per_proc": channels,
            "timeout_s": timeout,
            "routed": sum(routed), "all_routed_s": round(max(finished), 1) if len(finished) == len(children) else None,
            "server_cpu_s": round(cpu_seconds() - cpu_started, 1),
            "clients_cpu_s": round(sum(cpu_seconds(p.pid) for p in children), 1),
            "server_rss_mb": rss_bytes() // 2**20, "wall_s": round(time.perf_counter() - started, 1),
            "loadavg_start": load_start, "loadavg_end": loadavg(), "clients": errors, **pushes,
        }  # fmt: skip
    finally:
        for f in followers:
            f.cancel()
        await stop(children)
        await server.stop(0)


async def measure_pushes(director: TrafficDirector, streams: int, changes: int = 5) -> dict[str, object]:
    """Weight changes once every stream has its route: the time until all N ACKed it, the server CPU it
    took, and the longest the event loop did not run a 10 ms timer meanwhile (what a new stream or
    any other callback waits at worst while one push goes to N streams)."""
    acked = asyncio.Event()
    director.on_traffic_acked(lambda name, traffic: acked.set() if name == "svc-0" else None)
    worst_lag = 0.0

    async def ticker() -> None:
        nonlocal worst_lag
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            worst_lag = max(worst_lag, time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    times, cpu, lags = [], [], []
    try:
        for change in range(1, changes + 1):
            acked.clear()
            worst_lag = 0.0
            start, start_cpu = time.perf_counter(), cpu_seconds()
            director.set_canary_weight("svc-0", 10 + change)
            await asyncio.wait_for(acked.wait(), 300)
            times.append(time.perf_counter() - start)
            cpu.append(cpu_seconds() - start_cpu)
            lags.append(worst_lag)
    finally:
        tick.cancel()
    return {"push_to_all_acked_s": [round(t, 2) for t in times], "push_server_cpu_s": [round(c, 2) for c in cpu],
            "push_worst_loop_lag_s": [round(lag, 3) for lag in lags]}  # fmt: skip


async def client(port: int, streams: int, first_index: int, channels: int) -> None:
    """fanout_client's Envoy-like streams, reporting every second how many have a route, and the
    streams the server ended (retried after 1 s, as Envoy would) by status code."""
    from envoy.service.discovery.v3 import ads_pb2_grpc

    from tests.bench.fanout_client import proxy

    chans = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in chans]
    routes: asyncio.Queue[int] = asyncio.Queue()
    errors: dict[str, int] = {}

    async def envoy(index: int) -> None:
        while True:
            try:
                await proxy(stubs[index % channels], index, routes)
                return
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                await asyncio.sleep(1)

    started = time.monotonic()
    tasks = [asyncio.create_task(envoy(first_index + i)) for i in range(streams)]
    first_route: dict[int, float] = {}
    last_report = time.monotonic()
    while len(first_route) < streams:
        with contextlib.suppress(TimeoutError):
            index = await asyncio.wait_for(routes.get(), 1)
            first_route.setdefault(index, time.monotonic() - started)
        if time.monotonic() - last_report >= 1:
            last_report = time.monotonic()
            print(f"routed {len(first_route)} {json.dumps(errors)}", flush=True)
    times = sorted(first_route.values())
    print(f"ready {len(first_route)} {json.dumps(errors)} p50={times[len(times) // 2]:.1f}s max={times[-1]:.1f}s",
          flush=True)  # fmt: skip
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    for chan in chans:
        await chan.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("memory", "first-route"):
        p = sub.add_parser(name)
        p.add_argument("--server", choices=("aviary", "bare"), default="aviary")
        p.add_argument("--streams", type=int, nargs="+", default=[1000])
        p.add_argument("--procs", type=int, default=2, help="client processes")
        p.add_argument("--rollouts", type=int, default=100)
        p.add_argument("--trace", action="store_true", help="memory: Python allocations per stream, by line")
        p.add_argument("--timeout", type=float, default=180)
        p.add_argument("--channels", type=int, default=16, help="connections per client process (Envoys: 1 each)")
    c = sub.add_parser("client")
    c.add_argument("port", type=int)
    c.add_argument("--streams", type=int, default=1000)
    c.add_argument("--first-index", type=int, default=0)
    c.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    if args.mode == "client":
        asyncio.run(client(args.port, args.streams, args.first_index, args.channels))
        return
    if args.mode == "memory" and len(args.streams) > 1:  # one process per N: RSS is not given back between runs
        for streams in args.streams:
            argv = [a for a in sys.argv[1:] if a != "--streams" and a not in map(str, args.streams)]
            subprocess.run([sys.executable, "-m", "tests.bench.stream_memory", *argv, "--streams", str(streams)],
                           check=True)  # fmt: skip
        return
    for streams in args.streams:
        if args.mode == "memory":
            result = asyncio.run(measure_memory(args.server, streams, args.procs, args.rollouts, args.trace))
        else:
            result = asyncio.run(measure_first_route(
                args.server, streams, args.procs, args.rollouts, args.timeout, args.channels
            ))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
