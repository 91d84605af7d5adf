"""Resources that do not exist (yet) and resources that go away (Envoy's "xDS REST and gRPC
protocol": "Knowing When a Requested Resource Does Not Exist", "Deleting Resources")."""

from __future__ import annotations

from aviary.discovery.proxy_events import ResourcesAcked, SubscriptionChanged
from tests.conformance.clients import DELTA, SOTW
from tests.conformance.conftest import CDS, EDS, LDS, RDS, Plane, assignment, cluster, listener, route


async def test_a_name_that_does_not_exist_yet_is_sent_when_it_appears(plane: Plane) -> None:
    """SotW says nothing about it (the client times out); delta names it in removed_resources, once."""
    client = plane.client()
    client.start(EDS, ["later"])
    if plane.protocol == DELTA:
        update = await client.receive()
        assert update.removed == ("later",) and not update.resources
        client.ack(update)
        await plane.until(  # events from worker processes arrive a little after the responses
            lambda: any(isinstance(e, ResourcesAcked) and e.type_url == EDS for e in plane.events), "the EDS ACK"
        )
    else:
        await plane.until(
            lambda: any(isinstance(e, SubscriptionChanged) for e in plane.events), "the subscription handled"
        )
        assert plane.responses("node-a", EDS) == 0
    sent = plane.responses("node-a", EDS)
    plane.publish(cluster("unrelated"))  # a change that does not create it: nothing to say again
    client.start(LDS)  # answered after that publish
    assert (await client.receive()).type_url == LDS
    assert plane.responses("node-a", EDS) == sent
    later = assignment("later")
    plane.publish(later)
    update = await client.receive()
    assert update.resources == {"later": later.version} and not update.removed


async def test_a_listener_or_cluster_that_goes_away_is_deleted_from_the_client(plane: Plane) -> None:
    """SotW: the next whole-state response leaves it out; delta: removed_resources names it."""
    plane.publish(listener("l1"), listener("l2", 10001), cluster("c1"), cluster("c2"))
    client = plane.client()
    for type_url in (CDS, LDS):
        client.start(type_url)
        client.ack(await client.receive())
    plane.publish(listener("l1"), cluster("c1"))
    cds, lds = await client.receive(), await client.receive()
    assert (cds.type_url, lds.type_url) == (CDS, LDS)  # clusters first, as in every push
    if plane.protocol == SOTW:
        assert (cds.names, lds.names) == (["c1"], ["l1"])
    else:
        assert (cds.removed, lds.removed) == (("c2",), ("l2",)) and not cds.resources and not lds.resources
    assert (set(client.held[CDS]), set(client.held[LDS])) == ({"c1"}, {"l1"})


async def test_a_route_or_assignment_that_goes_away(plane: Plane) -> None:
    """SotW has no way to say it (the parent stops naming it; the response without it is a no-op for
    the client); delta names it in removed_resources."""
    plane.publish(route("r1"), route("r2"), assignment("e1"))
    client = plane.client()
    client.start(RDS, ["r1", "r2"])
    client.ack(await client.receive())
    plane.publish(route("r1"), assignment("e1"))
    update = await client.receive()
    assert update.type_url == RDS and "r2" not in update.resources
    if plane.protocol == DELTA:
        assert update.removed == ("r2",)
        assert set(client.held[RDS]) == {"r1"}
    else:
        assert update.removed == ()
