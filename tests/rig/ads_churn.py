"""Open and close many ADS streams in a loop against 127.0.0.1:PORT; print one JSON line of totals.

Run as a separate process so the control plane under test is measured alone:
    python -m tests.rig.ads_churn PORT --streams 2000 --seconds 60   (from the repository root)
Each stream sends a wildcard CDS request with a node, waits for the response, ACKs it and closes.

A stream whose first write fails is retried (up to 50 times) and counted in ``start_retries``, by
what the write raised; every failure after a stream has started is counted by phase and kind. The
test asserts both are 0: before the server raised grpc's pending-call limit
(``MAX_PENDING_STREAMS`` in xds/aviary/discovery/server.py), 3-5 % of starts failed here, reset
by the server (RST_STREAM after a CANCELLED status) before its handler ever saw them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

FAILURES: dict[str, int] = {}  # "<phase>: <kind>" -> streams that failed there (not retried)
START_RETRIES: dict[str, int] = {}  # what the first write raised -> starts retried
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


async def one_stream(stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, index: int) -> bool:
    node = base_pb2.Node(id=f"churn-{index}", cluster="churn")
    for attempt in range(50):
        # With thousands of streams starting at once on one channel, grpcio's client sometimes fails
        # the very first send locally (INTERNAL "execute_batch"), before the server sees the stream.
        call = stub.StreamAggregatedResources()
        try:
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node))
            break
        except grpc.aio.AioRpcError as exc:
            key = f"{exc.code().name}: {exc.details()}"[:120]
            START_RETRIES[key] = START_RETRIES.get(key, 0) + 1
            await asyncio.sleep(0.01 * attempt)  # back off: the channel is busy starting other streams
    else:
        FAILURES["start: gave up after 50 attempts"] = FAILURES.get("start: gave up after 50 attempts", 0) + 1
        return False
    phase = "response"  # waiting for the server's answer to the first request
    try:
        response = await asyncio.wait_for(call.read(), 10)
        if response is grpc.aio.EOF:
            FAILURES["response: stream ended without one"] = FAILURES.get("response: stream ended without one", 0) + 1
            return False
        phase = "close"  # ACK, half-close, the server's status
        ack = discovery_pb2.DiscoveryRequest(
            type_url=CDS, response_nonce=response.nonce, version_info=response.version_info
        )
        await call.write(ack)
        await call.done_writing()  # half-close: the server ends the stream, as a proxy shutting down would
        await asyncio.wait_for(call.code(), 10)
        return True
    except TimeoutError:
        FAILURES[f"{phase}: timeout"] = FAILURES.get(f"{phase}: timeout", 0) + 1
        call.cancel()
        return False
    except grpc.aio.AioRpcError as exc:
        key = f"{phase}: {exc.code().name}: {exc.details()}"[:120]
        FAILURES[key] = FAILURES.get(key, 0) + 1
        return False


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    deadline = time.monotonic() + args.seconds
    rounds = ok = failed = 0
    started = time.monotonic()
    while True:
        results = await asyncio.gather(*(one_stream(stubs[i % len(stubs)], i) for i in range(args.streams)))
        rounds += 1
        ok += sum(results)
        failed += len(results) - sum(results)
        if time.monotonic() >= deadline:
            break
    for channel in channels:
        await channel.close()
    elapsed = time.monotonic() - started
    print(json.dumps({"rounds": rounds, "streams_ok": ok, "streams_failed": failed, "seconds": round(elapsed, 1),
                      "streams_per_second": round((ok + failed) / elapsed, 1), "failures": FAILURES,
                      "start_retries": sum(START_RETRIES.values()), "start_retry_reasons": START_RETRIES}))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
