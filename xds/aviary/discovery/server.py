"""The ADS gRPC service on grpc.aio: one coroutine and one reader task per stream.

The method is registered with a pass-through response serializer: `SotwStream` hands us
responses already encoded from shared per-resource bytes, so nothing is re-serialized here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.proxy_events import ProxyDisconnected, ProxyEvent
from aviary.discovery.sotw import SotwStream, StreamError

log = logging.getLogger("aviary.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

_WAKE = object()
_END = object()


def _identity(data: bytes) -> bytes:
    return data


class AggregatedDiscoveryService:
    def __init__(self, cache: SnapshotCache, emit: Callable[[ProxyEvent], None]) -> None:
        self._cache = cache
        self._emit = emit
        self._stream_ids = itertools.count(1)
        self.open_streams = 0
        self.refused_streams = 0  # ended with INVALID_ARGUMENT for a protocol violation
        self.broken_streams = 0  # ended by an unexpected error in this server: a bug

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_aggregated_resources,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            },
        )

    async def stream_aggregated_resources(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, bytes],
    ) -> None:
        stream = SotwStream(next(self._stream_ids), context.peer(), self._cache, self._emit)
        inbox: asyncio.Queue[object] = asyncio.Queue()
        wake_pending = False

        def wake() -> None:
            nonlocal wake_pending
            if not wake_pending:
                wake_pending = True
                inbox.put_nowait(_WAKE)

        reader = asyncio.create_task(self._read(requests, inbox))
        watch = None
        self.open_streams += 1
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    return
                if item is _WAKE:
                    wake_pending = False
                    responses = stream.on_snapshot_changed()
                elif isinstance(item, BaseException):
                    raise item
                else:
                    assert isinstance(item, discovery_pb2.DiscoveryRequest)
                    try:
                        responses = stream.on_request(item)
                    except StreamError as exc:
                        self.refused_streams += 1
                        log.warning("closing stream of %s (%s): %s", stream.node_id, stream.peer, exc)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                        return
                    if watch is None and stream.node_id is not None:
                        watch = self._cache.watch(stream.node_cluster, wake)
                for response in responses:
                    await context.write(response)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            self.broken_streams += 1
            log.exception("xDS stream of %s (%s) failed", stream.node_id, stream.peer)
            raise
        finally:
            self.open_streams -= 1
            reader.cancel()
            if watch is not None:
                self._cache.cancel(watch)
            if stream.node_id is not None:
                self._emit(ProxyDisconnected(stream.stream_id))
                log.info("proxy disconnected: node=%s peer=%s", stream.node_id, stream.peer)

    @staticmethod
    async def _read(requests: AsyncIterator[discovery_pb2.DiscoveryRequest], inbox: asyncio.Queue[object]) -> None:
        try:
            async for request in requests:
                inbox.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken stream ends the handler with the reason
            inbox.put_nowait(exc)
            return
        inbox.put_nowait(_END)


async def start_xds_server(
    address: str,
    service: AggregatedDiscoveryService,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start serving ADS on `address`; returns the server and the bound port (for port 0)."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
    )
    server.add_generic_rpc_handlers((service.handler(),))
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if port == 0:
        raise OSError(f"cannot listen for xDS on {address}")
    await server.start()
    return server, port
