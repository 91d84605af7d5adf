"""Nonces, versions, ACK and NACK (Envoy's "xDS REST and gRPC protocol": "ACK/NACK and resource type
instance version", "When to send an update", "Duplicate Resource Names", incremental xDS nonces)."""

from __future__ import annotations

import grpc
import pytest

from tests.conformance.clients import DELTA, SOTW, DeltaClient, SotwClient
from tests.conformance.conftest import CDS, EDS, LDS, Plane, assignment, cluster, listener


async def test_every_response_carries_a_fresh_nonce(plane: Plane) -> None:
    plane.publish(cluster("a"))
    client = plane.client()
    client.start(CDS)
    first = await client.receive()
    plane.publish(cluster("a", timeout=2))
    second = await client.receive()
    assert first.nonce and second.nonce and first.nonce != second.nonce


async def test_the_first_request_must_carry_the_node(plane: Plane) -> None:
    client = plane.client()
    client.wire.send(CDS, node=False)
    assert await client.wire.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_node_may_be_left_out_after_the_first_request(plane: Plane) -> None:
    plane.publish(cluster("a"), listener("l"))
    client = plane.client()
    client.start(CDS)  # carries the node
    await client.receive()
    client.start(LDS)  # does not
    assert (await client.receive()).names == ["l"]


async def test_a_node_id_that_changes_on_a_stream_is_refused(plane: Plane) -> None:
    client = plane.client()
    client.start(CDS)
    await client.receive()
    client.wire.node.id = "someone-else"
    client.wire.send(LDS, node=True)
    assert await client.wire.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_ack_is_recorded_with_the_resources_the_client_holds(plane: Plane) -> None:
    a, b = cluster("a"), cluster("b")
    plane.publish(a, b)
    client = plane.client()
    client.start(CDS)
    update = await client.receive()
    assert update.resources == {"a": a.version, "b": b.version}
    client.ack(update)
    await plane.until_acked(CDS, {"a": a.version, "b": b.version})
    assert plane.responses("node-a", CDS) == 1  # an ACK of current content makes nothing new to send


async def test_a_nack_is_recorded_once_and_the_rejected_version_is_not_resent(plane: Plane) -> None:
    a = cluster("a")
    plane.publish(a)
    client = plane.client()
    client.start(CDS)
    first = await client.receive()
    client.ack(first)
    await plane.until_acked(CDS, {"a": a.version})
    bad = cluster("a", timeout=9)
    plane.publish(bad)
    second = await client.receive()
    client.nack(second, "rejected for the test")
    await plane.until(lambda: (p := plane.proxy()) is not None and p.last_nack is not None, "the NACK recorded")
    proxy = plane.proxy()
    assert proxy is not None and proxy.last_nack is not None
    assert proxy.last_nack.message == "rejected for the test" and proxy.nacks == 1
    assert dict(proxy.acked[CDS]) == {"a": a.version}  # it keeps its last good state
    assert plane.responses("node-a", CDS) == 2  # the NACK (handled) made no resend
    fixed = cluster("a", timeout=3)
    plane.publish(fixed)
    third = await client.receive()
    assert third.resources == {"a": fixed.version}
    client.ack(third)
    await plane.until_acked(CDS, {"a": fixed.version})
    assert plane.proxy() is not None and plane.proxy().nacks == 1  # type: ignore[union-attr]


async def test_versions_name_content_the_same_on_every_stream(plane: Plane) -> None:
    plane.publish(cluster("a"), cluster("b"))
    one, two = plane.client("node-a"), plane.client("node-b")
    one.start(CDS)
    two.start(CDS)
    first, second = await one.receive(), await two.receive()
    assert first.resources == second.resources  # per-resource versions: digests of the bytes
    if plane.protocol == SOTW:
        assert first.version == second.version  # SotW: the type's version too


async def test_a_response_is_sent_only_when_what_it_carries_changed(plane: Plane) -> None:
    a = cluster("a")
    plane.publish(a, assignment("a"))
    client = plane.client()
    client.start(CDS)
    update = await client.receive()
    client.ack(update)
    await plane.until_acked(CDS, {"a": a.version})
    plane.publish(a, assignment("a", port=9002))  # only EDS changed; this client does not ask for EDS
    plane.publish(a, assignment("a", port=9003))
    client.start(LDS)  # answered after the publishes: a CDS response would have come first
    assert (await client.receive()).type_url == LDS
    assert plane.responses("node-a", CDS) == 1


async def test_a_response_never_names_a_resource_twice(plane: Plane) -> None:
    plane.publish(*(cluster(f"c{i:02}") for i in range(50)))
    client = plane.client()
    client.start(CDS)
    update = await client.receive()
    names = [r.name for r in update.raw.resources] if plane.protocol == DELTA else update.names  # type: ignore[attr-defined]
    assert len(names) == len(set(names)) == 50


async def test_an_unsupported_type_is_ignored_and_the_stream_goes_on(plane: Plane) -> None:
    plane.publish(cluster("a"))
    client = plane.client()
    client.start("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
    client.start(CDS)
    assert (await client.receive()).names == ["a"]


@pytest.mark.parametrize("protocol", [SOTW])
async def test_sotw_a_request_with_a_stale_nonce_is_ignored(plane: Plane) -> None:
    plane.publish(cluster("a"))
    client = plane.client()
    assert isinstance(client, SotwClient)
    client.start(CDS)
    first = await client.receive()
    plane.publish(cluster("a", timeout=2))
    second = await client.receive()
    client.nack(first, "a late NACK of an older response")  # stale: must not count
    client.ack(second)
    await plane.until_acked(CDS, second.resources)
    proxy = plane.proxy()
    assert proxy is not None and proxy.last_nack is None


@pytest.mark.parametrize("protocol", [DELTA])
async def test_delta_each_response_is_acked_or_nacked_on_its_own(plane: Plane) -> None:
    """Delta responses are independent: several may be in flight and each is answered by its nonce."""
    plane.publish(assignment("x"), assignment("y"))
    client = plane.client()
    assert isinstance(client, DeltaClient)
    client.start(EDS, ["x"])
    first = await client.receive()
    client.subscribe(EDS, ["y"])
    second = await client.receive()
    client.ack(first)
    client.nack(second, "y is bad")
    await plane.until(lambda: (p := plane.proxy()) is not None and p.nacks == 1, "the NACK of the second")
    proxy = plane.proxy()
    assert proxy is not None and dict(proxy.acked[EDS]) == first.resources
