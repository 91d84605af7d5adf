"""Minimal in-process ADS clients for protocol tests: send requests, read responses with a deadline.

`AdsStream` is the part both protocols share (one channel, one ADS stream, an outbox of requests and
a reader task filling an inbox, the node attached to the first request); `AdsClient` here speaks
state of the world, `DeltaAdsClient` (tests/rig/delta_client.py) incremental.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Generic, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from aviary.discovery.server import ADS_SERVICE

RequestT = TypeVar("RequestT", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
ResponseT = TypeVar("ResponseT", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)


class AdsStream(Generic[RequestT, ResponseT]):
    """One discovery stream. ``method``: ADS's StreamAggregatedResources or DeltaAggregatedResources, or
    the full path of another discovery method (``/envoy.service.cluster.v3.ClusterDiscoveryService/
    StreamClusters``: a per-type service speaks the same messages)."""

    def __init__(
        self, port: int, method: str, response_type: type[ResponseT], node_id: str, node_cluster: str
    ) -> None:
        self.node = base_pb2.Node(id=node_id, cluster=node_cluster)
        self._response_type = response_type
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._outbox: asyncio.Queue[RequestT | None] = asyncio.Queue()
        request_type = (
            discovery_pb2.DeltaDiscoveryRequest
            if response_type is discovery_pb2.DeltaDiscoveryResponse
            else discovery_pb2.DiscoveryRequest
        )
        self._call = self._channel.stream_stream(
            method if method.startswith("/") else f"/{ADS_SERVICE}/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(self._requests())
        self._sent_node = False
        # Reads run in one task: cancelling a pending read() would cancel the whole RPC.
        self._inbox: asyncio.Queue[ResponseT | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._inbox.put_nowait(EOFError("stream ended"))
                    return
                assert isinstance(response, self._response_type)
                self._inbox.put_nowait(response)
        except BaseException as exc:
            self._inbox.put_nowait(exc)

    async def _requests(self) -> AsyncIterator[RequestT]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    def _queue(self, request: RequestT, error: str | None, node: bool | None) -> None:
        """Send ``request``, with the node when asked (by default: on the stream's first request)
        and ``error`` as its error_detail (a NACK)."""
        if node or (node is None and not self._sent_node):
            request.node.CopyFrom(self.node)
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(request)

    async def receive(self, timeout: float = 5.0) -> ResponseT:
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def expect_silence(self, seconds: float = 0.3) -> None:
        """Assert that nothing arrives for a while (upper-bounded wait, not synchronisation)."""
        try:
            response = await asyncio.wait_for(self._inbox.get(), seconds)
        except TimeoutError:
            return
        if isinstance(response, BaseException):
            raise response
        raise AssertionError(f"unexpected response: {response}")

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await self._channel.close()


class AdsClient(AdsStream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]):
    """State of the world: ``StreamAggregatedResources``."""

    def __init__(
        self, port: int, node_id: str = "test-node", node_cluster: str = "edge",
        method: str = "StreamAggregatedResources",
    ) -> None:  # fmt: skip
        super().__init__(port, method, discovery_pb2.DiscoveryResponse, node_id, node_cluster)

    def send(
        self,
        type_url: str,
        names: Iterable[str] = (),
        nonce: str = "",
        version: str = "",
        error: str | None = None,
        node: bool | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), response_nonce=nonce, version_info=version
        )
        self._queue(request, error, node)

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> None:
        self.send(response.type_url, names, nonce=response.nonce, version=response.version_info)

    def nack(self, response: discovery_pb2.DiscoveryResponse, message: str, names: Iterable[str] = ()) -> None:
        self.send(response.type_url, names, nonce=response.nonce, error=message)
