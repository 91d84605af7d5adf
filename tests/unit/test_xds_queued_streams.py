"""A stream that waits in grpc's queue while the event loop is busy is served late, not cancelled.

grpc.aio takes new calls one at a time through the event loop; until then grpc core queues them,
and cancels one that waited ``grpc.server_max_unrequested_time_in_server`` (default 30 s). With
10,000 streams starting at once the last ones waited that long (`make bench`, tests/bench/fanout.py:
904 of 10,000 ended CANCELLED 32.8 s after connecting, before the server saw them). Here the loop
is blocked for 2.5 s while streams start: with that limit at 1 s they are cancelled (the option is
what decides), with the server's own limit every one is answered.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from aviary.discovery import server as xds_server
from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server

STREAMS = 5
BLOCKED_SECONDS = 2.5


def _open_streams(port: int, started: threading.Event, codes: list[grpc.StatusCode]) -> None:
    """Start STREAMS streams (one LDS request each, then half-close), then collect how each ended."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)  # the handshake needs no event loop
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        calls = [
            stub.StreamAggregatedResources(
                iter([discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=f"node-{i}"), type_url=typeurls.LISTENER)]),
                timeout=30,
            )
            for i in range(STREAMS)
        ]
        started.set()
        for call in calls:
            try:
                for _response in call:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())


async def _codes_after_blocked_loop() -> list[grpc.StatusCode]:
    server, port = await start_xds_server("127.0.0.1:0", AggregatedDiscoveryService(SnapshotCache(), lambda e: None))
    codes: list[grpc.StatusCode] = []
    started = threading.Event()
    client = threading.Thread(target=_open_streams, args=(port, started, codes), daemon=True)
    try:
        client.start()
        assert started.wait(10)
        time.sleep(BLOCKED_SECONDS)  # noqa: ASYNC251 (the point: the event loop takes no call meanwhile)
        await asyncio.to_thread(client.join, 30)  # the loop runs again: the server takes the calls
        assert not client.is_alive()
    finally:
        await server.stop(0)
    return codes


async def test_streams_queued_while_the_loop_is_busy_are_answered() -> None:
    codes = await _codes_after_blocked_loop()
    assert codes == [grpc.StatusCode.OK] * STREAMS


async def test_grpc_cancels_queued_streams_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure the server's limit prevents: past the limit grpc cancels what waited."""
    monkeypatch.setattr(xds_server, "MAX_UNREQUESTED_SECONDS", 1)
    codes = await _codes_after_blocked_loop()
    assert grpc.StatusCode.CANCELLED in codes, codes
