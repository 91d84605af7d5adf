"""The xDS gRPC services on grpc.aio: one coroutine and one reader task per stream.

ADS (`AggregatedDiscoveryService`) and the four per-type discovery services (`PER_TYPE_SERVICES`:
ClusterDiscoveryService, EndpointDiscoveryService, ListenerDiscoveryService, RouteDiscoveryService,
for an Envoy configured with ``api_config_source`` instead of ``ads_config``), each in
State-of-the-World (`SotwStream`) and incremental (`DeltaStream`), are served by the same loop and
the same stream classes: a per-type stream is one restricted to its type (`only_type`). They are
registered with a pass-through response serializer: the streams hand us responses already encoded
from shared per-resource bytes, so nothing is re-serialized here. The per-type streams of a node
find each other in `NodeStreams` (a route waits for the node's cluster ACKs: `warm_routes`).

The reader handles a request itself when nothing is queued before it (an ACK, mostly: no switch
to the coroutine); the coroutine writes responses, in the order they were computed.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.delta import DeltaStream
from aviary.discovery.proxy_events import ProxyDisconnected, ProxyEvent
from aviary.discovery.sotw import SotwStream, StreamError
from aviary.discovery.warm_routes import AckSource, NodeStreams
from aviary.listen import ListenError, check_can_listen, grpc_options

log = logging.getLogger("aviary.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# service -> (State-of-the-World method, incremental method, the one type its streams serve)
PER_TYPE_SERVICES: dict[str, tuple[str, str, str]] = {
    "envoy.service.cluster.v3.ClusterDiscoveryService": ("StreamClusters", "DeltaClusters", typeurls.CLUSTER),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": ("StreamEndpoints", "DeltaEndpoints", typeurls.ENDPOINT),
    "envoy.service.listener.v3.ListenerDiscoveryService": ("StreamListeners", "DeltaListeners", typeurls.LISTENER),
    "envoy.service.route.v3.RouteDiscoveryService": ("StreamRoutes", "DeltaRoutes", typeurls.ROUTE),
}

_WAKE = object()
_END = object()

# grpc core queues a new call until the (single-threaded) aio server picks it up, and past
# ``grpc.server.max_pending_requests`` (default 1,000) it rejects new calls at random, all of them
# past the hard limit (default 3,000). Proxies reconnecting at once after a restart, or 2,000 ADS
# streams starting together (tests/e2e/test_churn.py), overflowed the defaults: 3-5 % of stream
# starts were reset by this server (RST_STREAM after a CANCELLED status) while its handlers never
# saw them. The queue holds calls that have only sent their headers: cheap to keep.
MAX_PENDING_STREAMS = 20_000
# A call queued that way is also cancelled once it has waited ``grpc.server_max_unrequested_time_in_server``
# (default 30 s): the aio server takes one new call per event-loop turn, and with 10,000 Envoys
# connecting at once (`make bench`, tests/bench/fanout.py) the last ones waited longer than that while
# the loop served the first ones: 904 of 10,000 streams ended CANCELLED 32.8 s after they connected,
# never handled, and a stream that is never retried never got its routes. A queued call costs little
# and is bounded in number above; it waits for its turn instead.
MAX_UNREQUESTED_SECONDS = 600


def _identity(data: bytes) -> bytes:
    return data


class _Stream(AckSource, Protocol):
    """What the serving loop needs of a stream's protocol state (`SotwStream`, `DeltaStream`)."""

    stream_id: int
    peer: str
    node_id: str | None
    node_cluster: str
    only_type: str | None

    def on_request(self, request: Any, /) -> list[bytes]: ...  # the protocol's request message

    def on_snapshot_changed(self) -> list[bytes]: ...


class _Inbox:
    """What a stream's coroutine waits on: requests, wake-ups and the end, in arrival order.

    An ``asyncio.Queue`` here cost about 3 KB per stream (three deques and an Event with a fourth);
    this holds a short list, and a future only while the stream waits.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[object] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        """Nothing waits to be handled: whatever is queued next is computed after now."""
        return not self._items


class UnimplementedMethods(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no types
    """Registered after the xDS handlers, so it sees only methods this server does not serve.

    It answers UNIMPLEMENTED as grpc would, but first logs the method and the peer, once per
    (method, peer host): an Envoy configured for a service this server does not offer (REST-style
    Fetch calls, or secrets and runtime discovery, say) retries such a call forever and stays in
    PRE_INITIALIZING, and without this line the server gives no hint why.
    """

    _MAX_LOGGED = 1024  # distinct (method, host) pairs remembered; a client inventing names cannot grow it

    def __init__(self) -> None:
        self._logged: set[tuple[str, str]] = set()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method

        async def refuse(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
            peer = context.peer()
            key = (method, peer.rsplit(":", 1)[0])  # "ipv4:10.0.0.5:41234": the port changes per connection
            if key not in self._logged and len(self._logged) < self._MAX_LOGGED:
                self._logged.add(key)
                log.warning("unimplemented RPC %s from %s: %s", method, peer, _unimplemented_hint(method))
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {method}")

        # Stream-stream fits every call shape; no deserializer: the request is never read.
        return grpc.stream_stream_rpc_method_handler(refuse)


def _unimplemented_hint(method: str) -> str:
    per_type = ", ".join(f"{service.rsplit('.', 1)[1]}/{sotw}|{delta}" for service, (sotw, delta, _) in
                         PER_TYPE_SERVICES.items())  # fmt: skip
    return (
        f"this server serves only /{ADS_SERVICE}/StreamAggregatedResources and DeltaAggregatedResources "
        f"(ADS, State-of-the-World and incremental) and the per-type streams {per_type}"
    )


class AggregatedDiscoveryService:
    def __init__(
        self,
        cache: SnapshotCache,
        emit: Callable[[ProxyEvent], None],
        first_stream_id: int = 1,
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._cache = cache
        self._emit = emit
        # Awaited before a stream's first request is answered: an xDS worker process catches up
        # with the engine's snapshots there (aviary.discovery.worker_protocol, "never older").
        self._admit = admit
        # An xDS worker process numbers from its own range (aviary.discovery.worker_protocol).
        self._stream_ids = itertools.count(first_stream_id)
        self.open_streams = 0
        self.refused_streams = 0  # ended with INVALID_ARGUMENT for a protocol violation
        self.broken_streams = 0  # ended by an unexpected error in this server: a bug
        self._inboxes: set[_Inbox] = set()
        self._closing = False
        self.node_streams = NodeStreams()  # per-type streams, by node and type (warm_routes)

    def close(self) -> None:
        """End every stream cleanly (status OK) and refuse new ones: call before stopping the server.

        grpc's own stop cancels the handlers still running after its grace period, and logs each
        cancelled one as an unhandled exception with a traceback; ended here, there is none left.
        """
        self._closing = True
        for inbox in self._inboxes:
            inbox.put_nowait(_END)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """ADS and the per-type services, both protocols each: one stream loop behind all of them."""

        def methods(sotw: str, delta: str, only_type: str | None) -> dict[str, grpc.RpcMethodHandler]:
            return {
                sotw: grpc.stream_stream_rpc_method_handler(
                    functools.partial(self.stream_sotw, only_type),
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
                delta: grpc.stream_stream_rpc_method_handler(
                    functools.partial(self.stream_delta, only_type),
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            }

        return [
            grpc.method_handlers_generic_handler(
                ADS_SERVICE, methods("StreamAggregatedResources", "DeltaAggregatedResources", None)
            ),
            *(
                grpc.method_handlers_generic_handler(service, methods(sotw, delta, only_type))
                for service, (sotw, delta, only_type) in PER_TYPE_SERVICES.items()
            ),
        ]

    async def stream_sotw(
        self,
        only_type: str | None,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, bytes],
    ) -> None:
        """A State-of-the-World stream: ADS (`only_type` None) or one per-type service's."""
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down")
        stream = SotwStream(next(self._stream_ids), context.peer(), self._cache, self._emit, only_type=only_type,
                            siblings=self.node_streams)  # fmt: skip
        await self._serve(stream, requests, context)

    async def stream_delta(
        self,
        only_type: str | None,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes],
    ) -> None:
        """An incremental stream: ADS (`only_type` None) or one per-type service's."""
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down")
        stream = DeltaStream(next(self._stream_ids), context.peer(), self._cache, self._emit, only_type=only_type,
                             siblings=self.node_streams)  # fmt: skip
        await self._serve(stream, requests, context)

    async def _serve(
        self, stream: _Stream, requests: AsyncIterator[object], context: grpc.aio.ServicerContext[object, bytes]
    ) -> None:
        """One stream, either protocol: requests and snapshot changes in, encoded responses out."""
        inbox: _Inbox = _Inbox()
        self._inboxes.add(inbox)
        wake_pending = False

        def wake() -> None:
            nonlocal wake_pending
            if not wake_pending:
                wake_pending = True
                inbox.put_nowait(_WAKE)

        reader = asyncio.create_task(self._read(requests, inbox, stream))
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
                elif isinstance(item, list):  # what a request handled by the reader called for
                    responses = item
                elif isinstance(item, BaseException) and not isinstance(item, StreamError):
                    raise item
                else:
                    try:
                        if isinstance(item, StreamError):  # from a request the reader handled
                            raise item
                        assert isinstance(item, discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest)
                        if self._admit is not None and stream.node_id is None:
                            await self._admit()
                        responses = stream.on_request(item)
                    except StreamError as exc:
                        self.refused_streams += 1
                        log.warning("closing stream of %s (%s): %s", stream.node_id, stream.peer, exc)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                        return
                    if watch is None and stream.node_id is not None:
                        watch = self._cache.watch(stream.node_cluster, wake)
                        if stream.only_type is not None:
                            self.node_streams.add(stream.node_id, stream.only_type, stream, wake)
                # Nothing stays referenced from this frame while it waits for the next item: the last
                # request and response would otherwise be kept per idle stream (~8 KB with 200 clusters).
                item = None
                while responses:
                    await context.write(responses.pop(0))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            self.broken_streams += 1
            log.exception("xDS stream of %s (%s) failed", stream.node_id, stream.peer)
            raise
        finally:
            self.open_streams -= 1
            self._inboxes.discard(inbox)
            reader.cancel()
            if watch is not None:
                self._cache.cancel(watch)
            if stream.only_type is not None and stream.node_id is not None:
                self.node_streams.remove(stream.node_id, stream.only_type, stream)
            if stream.node_id is not None:
                self._emit(ProxyDisconnected(stream.stream_id))
                log.info("proxy disconnected: node=%s peer=%s", stream.node_id, stream.peer)

    @staticmethod
    async def _read(requests: AsyncIterator[object], inbox: _Inbox, stream: _Stream) -> None:
        """Hand the stream's requests over in order; handle one here when nothing is queued before it.

        Most requests are ACKs that call for no response: handled here, they cost no switch to the
        stream's coroutine (one per proxy per change). Only when the inbox is empty: whatever is
        queued (a snapshot change, an earlier request) is handled by the coroutine later, and
        responses must go out in the order they were computed, or a proxy could apply an older one
        last. The first request waits for `admit` in the coroutine, so it is always handed over.
        """
        try:
            async for request in requests:
                if stream.node_id is not None and inbox.empty():
                    try:
                        responses = stream.on_request(request)
                    except StreamError as exc:
                        inbox.put_nowait(exc)  # the coroutine closes the stream
                        return
                    if responses:
                        inbox.put_nowait(responses)
                else:
                    inbox.put_nowait(request)
                del request  # not kept while waiting for the next one
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
    *,
    reuse_port: bool = False,
    extra_handlers: tuple[grpc.GenericRpcHandler, ...] = (),
) -> tuple[grpc.aio.Server, int]:
    """Start serving xDS (ADS, per-type services) on `address`; returns the server and the bound port (for port 0).

    A busy address is a ``ListenError``: SO_REUSEPORT is off unless ``reuse_port`` (one instance
    sharing the port among its own processes), so a second control plane cannot start silently
    and split the proxies with the first (``aviary.listen``). ``extra_handlers``: more services on
    the same address (the Envoy report services, ``aviary.reports.ingest``).
    """
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.server.max_pending_requests", MAX_PENDING_STREAMS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_STREAMS),
            ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_SECONDS),
            *grpc_options(reuse_port),
        ]
    )
    server.add_generic_rpc_handlers((*service.handlers(), *extra_handlers, UnimplementedMethods()))  # fallback last
    try:
        port = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
    except RuntimeError:  # grpcio's "Failed to bind"; the OS error went to its log only
        port = 0
    if port == 0:
        check_can_listen("xds", address)  # raises with the OS error if it can name one
        raise ListenError("xds", address, "cannot listen")
    await server.start()
    return server, port
