"""A minimal in-process incremental (delta) ADS client for protocol tests: the twin of ads_client.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2


class DeltaAdsClient:
    def __init__(self, port: int, node_id: str = "test-node", node_cluster: str = "edge") -> None:
        self.node = base_pb2.Node(id=node_id, cluster=node_cluster)
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._outbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = asyncio.Queue()
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel).DeltaAggregatedResources(
            self._requests()
        )
        self._sent_node = False
        self._inbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._inbox.put_nowait(EOFError("stream ended"))
                    return
                assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
                self._inbox.put_nowait(response)
        except BaseException as exc:
            self._inbox.put_nowait(exc)

    async def _requests(self) -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    def send(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        nonce: str = "",
        error: str | None = None,
        initial: Mapping[str, str] | None = None,
        node: bool | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
            initial_resource_versions=dict(initial or {}),
        )
        if node or (node is None and not self._sent_node):
            request.node.CopyFrom(self.node)
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(request)

    def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        self.send(response.type_url, nonce=response.nonce)

    def nack(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> None:
        self.send(response.type_url, nonce=response.nonce, error=message)

    async def receive(self, timeout: float = 5.0) -> discovery_pb2.DeltaDiscoveryResponse:
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await self._channel.close()
