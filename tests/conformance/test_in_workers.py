"""The same rules with the streams in worker processes (`aviary serve --xds-workers 2`).

The `plane` fixture here serves the cache through `XdsWorkers`: two real worker processes hold the
streams, the resources reach them as bytes over the engine's pipes, and the proxy events come back
the same way. A selection of the suite's tests (imported below, so collected again with this
module's fixture) runs against them, over both protocols: what the single process guarantees, the
workers guarantee too. (Not the per-type route hold: it reads the node's streams in one process, and
these test clients connect each stream on its own connection, which may land in another worker;
Envoy multiplexes its streams on one connection: see aviary.discovery.warm_routes.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.workers import XdsWorkers
from tests.conformance.conftest import Plane
from tests.conformance.test_existence_and_deletion import (
    test_a_listener_or_cluster_that_goes_away_is_deleted_from_the_client,
    test_a_name_that_does_not_exist_yet_is_sent_when_it_appears,
)
from tests.conformance.test_nonces_versions_acks import (
    test_a_nack_is_recorded_once_and_the_rejected_version_is_not_resent,
    test_an_ack_is_recorded_with_the_resources_the_client_holds,
    test_every_response_carries_a_fresh_nonce,
)
from tests.conformance.test_ordering_and_reconnect import (
    test_a_new_cluster_and_its_endpoints_are_acked_before_the_route_that_uses_it,
    test_a_reconnecting_client_is_not_sent_an_older_or_different_version,
)
from tests.conformance.test_per_type_services import (
    test_a_nodes_streams_are_one_proxy,
    test_a_request_for_another_type_ends_the_stream,
    test_each_service_serves_its_own_type,
)
from tests.conformance.test_subscriptions import (
    test_naming_a_resource_ends_the_legacy_wildcard_only_as_the_protocol_says,
)

__all__ = [
    "test_a_listener_or_cluster_that_goes_away_is_deleted_from_the_client",
    "test_a_nack_is_recorded_once_and_the_rejected_version_is_not_resent",
    "test_a_name_that_does_not_exist_yet_is_sent_when_it_appears",
    "test_a_new_cluster_and_its_endpoints_are_acked_before_the_route_that_uses_it",
    "test_a_nodes_streams_are_one_proxy",
    "test_a_reconnecting_client_is_not_sent_an_older_or_different_version",
    "test_a_request_for_another_type_ends_the_stream",
    "test_an_ack_is_recorded_with_the_resources_the_client_holds",
    "test_each_service_serves_its_own_type",
    "test_every_response_carries_a_fresh_nonce",
    "test_naming_a_resource_ends_the_legacy_wildcard_only_as_the_protocol_says",
]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def plane(protocol: str) -> AsyncIterator[Plane]:
    cache, proxies = SnapshotCache(), ProxyStatus()
    state = Plane(cache, proxies, 0, protocol)
    workers = XdsWorkers(cache, state.record, "127.0.0.1:0", 2)
    state.port = await workers.start()
    try:
        yield state
    finally:
        for client in state.clients:
            await client.close()
        await workers.stop(0)


async def test_the_streams_are_held_by_the_worker_processes(plane: Plane) -> None:
    from aviary.discovery.worker_protocol import worker_of
    from tests.conformance.conftest import CDS, cluster

    plane.publish(cluster("a"))
    client = plane.client()
    client.start(CDS)
    client.ack(await client.receive())
    await plane.until(lambda: plane.proxy() is not None, "the proxy reported")
    proxy = plane.proxy()
    assert proxy is not None and worker_of(proxy.stream_id) >= 1
