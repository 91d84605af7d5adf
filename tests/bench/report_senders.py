"""Fake proxies flushing their stats to Aviary: ``python -m tests.bench.report_senders --address A --proxies N``.

Each fake proxy holds one ``MetricsService.StreamMetrics`` stream (its node id in the first
message, as Envoy sends it) and sends one message every ``--interval`` seconds, at a random phase;
the message is built once and sent as bytes, so the sender costs little beside the server. The
message has the shape of what Envoy 1.40 sends for a few clusters (``FAMILIES`` families, the
``cluster.upstream_rq_xx`` counters of ``CLUSTERS`` clusters among them). Streams share
``--channels`` connections (the kernel spreads connections over the server's workers).
Prints one JSON line at the end: messages sent, bytes per message, CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time

import grpc

from aviary.reports.ingest import METRICS_SERVICE
from aviary.reports.v1 import envoy_metrics_pb2 as pb

FAMILIES = 140  # families in one flush of an Envoy with a few clusters (measured: 126-143)
CLUSTERS = 4


def _family(name: str, cluster: str, classes: dict[str, float]) -> pb.MetricFamily:
    return pb.MetricFamily(name=name, type=0, metric=[
        pb.Metric(label=[pb.LabelPair(name="envoy.response_code_class", value=code),
                         pb.LabelPair(name="envoy.cluster_name", value=cluster)],
                  counter=pb.Counter(value=value)) for code, value in classes.items()])


def message(node_id: str | None) -> bytes:
    """One flush: the request counters of ``CLUSTERS`` clusters and filler families of the same shape."""
    families = [_family("cluster.upstream_rq_xx", f"shop-{i}_v{i % 2 + 1}", {"2": 37.0, "5": 1.0})
                for i in range(CLUSTERS)]
    families += [_family(f"cluster.upstream_cx_stat_{i}", f"shop-{i % CLUSTERS}_v1", {"": float(i)})
                 for i in range(FAMILIES - CLUSTERS)]
    out = pb.StreamMetricsMessage(envoy_metrics=families)
    if node_id is not None:
        out.identifier.node.id = node_id
        out.identifier.node.cluster = "edge"
    return out.SerializeToString()


async def proxy(channel: grpc.aio.Channel, node_id: str, interval: float, until: float, sent: list[int]) -> None:
    first, rest = message(node_id), message(None)
    call = channel.stream_unary(f"/{METRICS_SERVICE}/StreamMetrics")()

    async def flushes() -> None:
        await asyncio.sleep(random.uniform(0, interval))  # pacing: each proxy flushes at its own phase
        await call.write(first)
        sent[0] += 1
        while time.monotonic() < until:
            await asyncio.sleep(interval)
            await call.write(rest)
            sent[0] += 1
        await call.done_writing()

    try:
        await flushes()
        await call
    except grpc.aio.AioRpcError:
        sent[1] += 1


async def run(address: str, proxies: int, first: int, channels: int, interval: float, seconds: float) -> None:
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    until = time.monotonic() + seconds
    sent = [0, 0]
    await asyncio.gather(*(proxy(opened[i % channels], f"proxy-{first + i}", interval, until, sent)
                           for i in range(proxies)))
    for channel in opened:
        await channel.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"sent": sent[0], "failed_streams": sent[1], "bytes_per_message": len(message(None)),
                      "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--proxies", type=int, default=500)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--channels", type=int, default=25)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    asyncio.run(run(args.address, args.proxies, args.first, args.channels, args.interval, args.seconds))


if __name__ == "__main__":
    main()
