"""A minimal in-process ADS client for protocol tests: send DiscoveryRequests, read responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2


class AdsClient:
    def __init__(self, port: int, node_id: str = "test-node", node_cluster: str = "edge") -> None:
        self.node = base_pb2.Node(id=node_id, cluster=node_cluster)
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel).StreamAggregatedResources(
            self._requests()
        )
        self._sent_node = False
        # Reads run in one task: cancelling a pending read() would cancel the whole RPC.
        self._inbox: asyncio.Queue[discovery_pb2.DiscoveryResponse | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._inbox.put_nowait(EOFError("stream ended"))
                    return
                assert isinstance(response, discovery_pb2.DiscoveryResponse)
                self._inbox.put_nowait(response)
        except BaseException as exc:
            self._inbox.put_nowait(exc)

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

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
        if node or (node is None and not self._sent_node):
            request.node.CopyFrom(self.node)
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(request)

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> None:
        self.send(response.type_url, names, nonce=response.nonce, version=response.version_info)

    def nack(self, response: discovery_pb2.DiscoveryResponse, message: str, names: Iterable[str] = ()) -> None:
        self.send(response.type_url, names, nonce=response.nonce, error=message)

    async def receive(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
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
