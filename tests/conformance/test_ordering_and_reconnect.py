"""Warming order, make-before-break and reconnecting (Envoy's "xDS REST and gRPC protocol":
"Resource warming", "Eventual consistency considerations", and the incremental reconnect with
initial_resource_versions). The ordering tests run Aviary's `TrafficDirector` in front of the cache."""

from __future__ import annotations

import pytest

from aviary.discovery.director import Placement
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan
from tests.conformance.clients import DELTA, SOTW, DeltaClient, SotwClient, Update
from tests.conformance.conftest import CDS, EDS, LDS, RDS, Plane, assignment, cluster

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
ROUTE = "route-127.0.0.1-10000"
OLD, NEW = "checkout_v1", "checkout_v2"


async def settled_client(plane: Plane) -> SotwClient | DeltaClient:
    """A client that asked for everything Envoy asks for, in Envoy's order, and ACKed it all."""
    plane.director().set_rollout("checkout", Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",)),
                                 TrafficPlan(V1))
    client = plane.client()
    for type_url, names in ((CDS, ()), (EDS, (OLD,)), (LDS, ()), (RDS, (ROUTE,))):
        client.start(type_url, names)
        update = await client.receive()
        assert update.type_url == type_url
        client.ack(update)
    await plane.until_acked(RDS, dict(client.held[RDS]))
    return client


async def test_a_new_cluster_and_its_endpoints_are_acked_before_the_route_that_uses_it(plane: Plane) -> None:
    client = await settled_client(plane)
    routes_sent = plane.responses("node-a", RDS)
    plane.director().set_desired_traffic("checkout", TrafficPlan(V1, V2, 10))
    cds = await client.receive()
    assert cds.type_url == CDS and NEW in client.held[CDS]
    client.ack(cds)
    await plane.until_acked(CDS, dict(client.held[CDS]))
    assert plane.responses("node-a", RDS) == routes_sent  # the cluster has no endpoints at the client yet
    client.subscribe(EDS, [NEW])  # as Envoy does while the new cluster warms
    eds = await client.receive()
    assert eds.type_url == EDS and NEW in eds.resources
    client.ack(eds)
    rds = await client.receive()  # only now
    assert rds.type_url == RDS and ROUTE in rds.resources


async def test_an_old_cluster_leaves_only_after_the_route_without_it_is_acked(plane: Plane) -> None:
    client = await settled_client(plane)
    plane.director().set_desired_traffic("checkout", TrafficPlan(V2))  # v1 -> v2 outright
    cds = await client.receive()
    assert cds.type_url == CDS and OLD in client.held[CDS] and NEW in client.held[CDS]
    client.ack(cds)
    client.subscribe(EDS, [NEW])
    client.ack(await client.receive())
    rds = await client.receive()
    assert rds.type_url == RDS
    assert OLD in client.held[CDS]  # still there while the route that named it may be in use
    client.ack(rds)
    gone = await client.receive()
    assert gone.type_url == CDS
    assert set(client.held[CDS]) == {NEW}


async def test_a_reconnecting_client_is_not_sent_an_older_or_different_version(plane: Plane) -> None:
    """SotW: the whole state again, with the same versions (they name content, not streams); delta:
    with initial_resource_versions, only what changed meanwhile travels, and what went away is removed."""
    plane.publish(cluster("same"), cluster("changes"), cluster("goes"))
    client = plane.client()
    client.start(CDS)
    before = await client.receive()
    client.ack(before)
    await plane.until_acked(CDS, before.resources)
    await client.close()
    changed = cluster("changes", timeout=7)
    plane.publish(cluster("same"), changed)
    again = plane.adopt(client.reconnected())
    update = await again.receive()
    if plane.protocol == SOTW:
        assert update.resources == {"same": before.resources["same"], "changes": changed.version}
    else:
        assert update.resources == {"changes": changed.version} and update.removed == ("goes",)
    assert again.held[CDS] == {"same": before.resources["same"], "changes": changed.version}


@pytest.mark.parametrize("protocol", [DELTA])
async def test_delta_a_reconnect_with_everything_current_resends_nothing_and_its_ack_counts(plane: Plane) -> None:
    plane.publish(assignment("e1"), assignment("e2"))
    client = plane.client()
    client.start(EDS, ["e1", "e2"])
    held = await client.receive()
    client.ack(held)
    await client.close()
    again = plane.adopt(client.reconnected())
    update: Update = await again.receive()
    assert update.resources == {} and update.removed == ()  # an empty answer: nothing resent
    again.ack(update)
    await plane.until_acked(EDS, held.resources)  # the gates see what this stream holds
