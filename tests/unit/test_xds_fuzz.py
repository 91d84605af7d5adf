"""Malformed DiscoveryRequests: each gets a protocol error or is ignored; nothing crashes.

Two layers: many examples against the pure protocol state (`SotwStream`), then fewer through the
real gRPC server while a well-behaved stream checks that it is still being served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_events import ProxyEvent
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.discovery.sotw import MAX_RESOURCE_NAMES, SotwStream, StreamError
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan
from tests.rig.ads_client import AdsClient

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))

type_urls = st.one_of(
    st.sampled_from(sorted(typeurls.SUPPORTED)),
    st.sampled_from(["", "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "bogus"]),
    st.text(max_size=40),
)
names = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(["*", "checkout_v1", "route-127.0.0.1-10000"])),
                 max_size=20)
nonces = st.one_of(st.just(""), st.text(max_size=12), st.integers(0, 50).map(str))
nodes = st.one_of(
    st.none(),
    st.builds(base_pb2.Node, id=st.sampled_from(["fuzz", "other", ""]), cluster=st.sampled_from(["edge", "", "x"])),
)


@st.composite
def requests(draw: st.DrawFn) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=draw(type_urls),
        resource_names=draw(names),
        response_nonce=draw(nonces),
        version_info=draw(st.text(max_size=20)),
    )
    node = draw(nodes)
    if node is not None:
        request.node.CopyFrom(node)
    if draw(st.booleans()):
        status = status_pb2.Status(code=draw(st.integers(0, 16)), message=draw(st.text(max_size=40)))
        request.error_detail.CopyFrom(status)
    return request


def _cache() -> SnapshotCache:
    cache = SnapshotCache()
    director = TrafficDirector(cache, ProxyStatus())
    director.set_rollout("checkout", Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",)),
                         TrafficPlan(V1, V2, 10))
    return cache


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=12))
def test_protocol_state_survives_any_request_sequence(sequence: list[discovery_pb2.DiscoveryRequest]) -> None:
    events: list[ProxyEvent] = []
    stream = SotwStream(1, "fuzz-peer", _cache(), events.append)
    for request in sequence:
        try:
            responses = stream.on_request(request)
        except StreamError as exc:
            assert str(exc)  # a named reason; the server turns it into INVALID_ARGUMENT
            return
        for data in responses:
            response = discovery_pb2.DiscoveryResponse.FromString(data)
            assert response.nonce and response.type_url in typeurls.SUPPORTED
            resource_names = [r.value for r in response.resources]
            assert len(resource_names) == len(set(resource_names)), "a resource twice in one response"


def test_huge_resource_names_list_is_refused() -> None:
    stream = SotwStream(1, "peer", _cache(), lambda event: None)
    request = discovery_pb2.DiscoveryRequest(type_url=typeurls.ENDPOINT, node=base_pb2.Node(id="n"),
                                             resource_names=[f"r{i}" for i in range(MAX_RESOURCE_NAMES + 1)])
    with pytest.raises(StreamError, match="at most"):
        stream.on_request(request)


def test_changed_node_on_a_later_request_is_refused() -> None:
    stream = SotwStream(1, "peer", _cache(), lambda event: None)
    stream.on_request(discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER, node=base_pb2.Node(id="a")))
    with pytest.raises(StreamError, match=r"node\.id changed"):
        stream.on_request(discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER, node=base_pb2.Node(id="b")))


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, TrafficDirector, AggregatedDiscoveryService]]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    director.set_rollout("checkout", Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",)),
                         TrafficPlan(V1))
    service = AggregatedDiscoveryService(cache, proxies.apply)
    server, port = await start_xds_server("127.0.0.1:0", service)
    try:
        yield port, director, service
    finally:
        await server.stop(0)


async def test_malformed_streams_do_not_disturb_other_streams(
    served: tuple[int, TrafficDirector, AggregatedDiscoveryService],
) -> None:
    port, director, service = served
    healthy = AdsClient(port, "healthy")
    healthy.send(typeurls.CLUSTER)
    first = await healthy.receive(timeout=20)
    healthy.ack(first)

    examples = st.lists(requests(), min_size=1, max_size=6)
    outcomes: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(examples)
    def collect(sequence: list[discovery_pb2.DiscoveryRequest]) -> None:
        sequences.append(sequence)

    sequences: list[list[discovery_pb2.DiscoveryRequest]] = []
    collect()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    async def drain(call: grpc.aio.StreamStreamCall[discovery_pb2.DiscoveryRequest,
                                                   discovery_pb2.DiscoveryResponse]) -> None:
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass

    for sequence in sequences:
        call = stub.StreamAggregatedResources()
        reader = asyncio.create_task(drain(call))
        try:
            for request in sequence:  # exactly as drawn, node or not
                await call.write(request)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the server already ended the stream; its status below says why
        code = await asyncio.wait_for(call.code(), 10)
        await reader
        # OK: ended when the client half-closed; INVALID_ARGUMENT: refused with a reason; INTERNAL:
        # grpcio's client failing its own queued writes after a refusal. UNKNOWN would be a server bug.
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), code
        outcomes[code.name] = outcomes.get(code.name, 0) + 1
    await channel.close()

    # The well-behaved stream is still served: a change reaches it.
    director.set_desired_traffic("checkout", TrafficPlan(V1, V2, 0))
    update = await healthy.receive(timeout=20)
    assert update.type_url == typeurls.CLUSTER
    await healthy.close()
    print("fuzzed streams:", outcomes, "refused by the server:", service.refused_streams)
    assert sum(outcomes.values()) == len(sequences)
    assert service.broken_streams == 0
    assert service.refused_streams > 0  # the examples include streams that must be refused
