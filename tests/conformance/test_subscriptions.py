"""Wildcard and named subscriptions, subscribing and unsubscribing (Envoy's "xDS REST and gRPC
protocol": "How the client specifies what resources to return", "Unsubscribing From Resources",
and the incremental "Subscribing to Resources" / "Unsubscribing from Resources")."""

from __future__ import annotations

import pytest

from aviary.discovery.proxy_events import SubscriptionChanged
from tests.conformance.clients import DELTA, SOTW
from tests.conformance.conftest import CDS, EDS, LDS, RDS, Plane, assignment, cluster, listener, route


def subscription_changes(plane: Plane, type_url: str) -> int:
    return sum(1 for e in plane.events if isinstance(e, SubscriptionChanged) and e.type_url == type_url)


@pytest.mark.parametrize("type_url", [LDS, CDS])
async def test_a_first_request_naming_nothing_is_the_legacy_wildcard_for_lds_and_cds(
    plane: Plane, type_url: str
) -> None:
    plane.publish(listener("l1"), listener("l2", 10001), cluster("c1"), cluster("c2"))
    client = plane.client()
    client.start(type_url)
    update = await client.receive()
    assert sorted(update.names) == (["l1", "l2"] if type_url == LDS else ["c1", "c2"])


async def test_star_is_the_wildcard(plane: Plane) -> None:
    plane.publish(cluster("c1"), cluster("c2"))
    client = plane.client()
    client.start(CDS, ["*"])
    assert sorted((await client.receive()).names) == ["c1", "c2"]


async def test_rds_and_eds_send_only_the_names_asked_for(plane: Plane) -> None:
    plane.publish(route("r1"), route("r2"), assignment("e1"), assignment("e2"))
    client = plane.client()
    client.start(RDS, ["r2"])
    assert (await client.receive()).names == ["r2"]
    client.start(EDS, ["e1"])
    assert (await client.receive()).names == ["e1"]


async def test_the_wildcard_leaves_out_what_is_only_for_those_who_name_it(plane: Plane) -> None:
    plane.publish(listener("envoy-listener"), listener("grpc-api", 10001, wildcard=False))
    client = plane.client()
    client.start(LDS)
    assert (await client.receive()).names == ["envoy-listener"]
    client.subscribe(LDS, ["*", "grpc-api"])
    update = await client.receive()
    assert "grpc-api" in update.names
    assert set(client.held[LDS]) == {"envoy-listener", "grpc-api"}


async def test_naming_a_resource_ends_the_legacy_wildcard_only_as_the_protocol_says(plane: Plane) -> None:
    """SotW: naming "a" after the legacy wildcard replaces it; delta: subscribing "a" adds to it,
    and the wildcard ends only when "*" is unsubscribed."""
    plane.publish(cluster("a"), cluster("b"))
    client = plane.client()
    client.start(CDS)
    client.ack(await client.receive())
    client.subscribe(CDS, ["a"])
    if plane.protocol == SOTW:
        assert (await client.receive()).names == ["a"]  # b is gone from the whole state
        assert set(client.held[CDS]) == {"a"}
        client.unsubscribe(CDS, ["a"])  # no names at all now: no subscription, not the wildcard again
        assert (await client.receive()).names == []
    else:
        update = await client.receive()  # a is resent: a name subscribed to is always (re)sent
        assert update.names == ["a"] and not update.removed
        client.ack(update)
        client.unsubscribe(CDS, ["*"])
        update = await client.receive()
        assert update.removed == ("b",)
        assert set(client.held[CDS]) == {"a"}


async def test_unsubscribed_resources_are_no_longer_sent(plane: Plane) -> None:
    plane.publish(route("r1"), route("r2"))
    client = plane.client()
    client.start(RDS, ["r1", "r2"])
    client.ack(await client.receive())
    client.unsubscribe(RDS, ["r2"])
    await plane.until(lambda: subscription_changes(plane, RDS) == 2, "the unsubscription handled")
    if plane.protocol == DELTA:
        assert plane.responses("node-a", RDS) == 1  # delta: an unsubscription alone needs no response
    else:
        assert (await client.receive()).names == ["r1"]  # SotW: the new state of what is subscribed
    sent = plane.responses("node-a", RDS)
    plane.publish(route("r1"), route("r2", host="changed.example.com"))
    client.start(LDS)  # answered after that publish: an RDS response would have come first
    assert (await client.receive()).type_url == LDS
    assert plane.responses("node-a", RDS) == sent


@pytest.mark.parametrize("protocol", [DELTA])
async def test_delta_a_name_subscribed_again_is_sent_again(plane: Plane) -> None:
    """The client may have forgotten it: a subscription to a name it should hold is still answered."""
    e1 = assignment("e1")
    plane.publish(e1)
    client = plane.client()
    client.start(EDS, ["e1"])
    client.ack(await client.receive())
    client.subscribe(EDS, ["e1"])
    again = await client.receive()
    assert again.resources == {"e1": e1.version}


@pytest.mark.parametrize("protocol", [DELTA])
async def test_delta_unsubscribing_a_name_under_the_wildcard_says_whether_to_keep_it(plane: Plane) -> None:
    """With "*" and a name: unsubscribing the name resends it if "*" covers it, else removes it."""
    plane.publish(listener("covered"), listener("named-only", 10001, wildcard=False))
    client = plane.client()
    client.start(LDS, ["*", "covered", "named-only"])
    client.ack(await client.receive())
    client.unsubscribe(LDS, ["covered"])
    update = await client.receive()
    assert update.names == ["covered"] and not update.removed
    client.ack(update)
    client.unsubscribe(LDS, ["named-only"])
    update = await client.receive()
    assert update.removed == ("named-only",) and not update.resources
    assert set(client.held[LDS]) == {"covered"}


@pytest.mark.parametrize("protocol", [DELTA])
async def test_delta_subscription_changes_count_whatever_the_nonce(plane: Plane) -> None:
    """A spontaneous request has no nonce; one with a stale nonce still changes the subscription."""
    plane.publish(assignment("e1"), assignment("e2"), assignment("e3"))
    client = plane.client()
    client.start(EDS, ["e1"])
    first = await client.receive()
    client.ack(first)
    client.subscribe(EDS, ["e2"])  # spontaneous: no nonce
    second = await client.receive()
    assert second.names == ["e2"]
    client.wire.send(EDS, subscribe=["e3"], nonce=first.nonce)  # an old nonce
    assert (await client.receive()).names == ["e3"]
