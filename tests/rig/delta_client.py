"""A minimal in-process incremental (delta) ADS client for protocol tests: the twin of ads_client.py,
sharing its stream (`AdsStream`: connect, send, receive with a deadline, close)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.service.discovery.v3 import discovery_pb2

from tests.rig.ads_client import AdsStream


class DeltaAdsClient(AdsStream[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse]):
    """Incremental: ``DeltaAggregatedResources``."""

    def __init__(
        self, port: int, node_id: str = "test-node", node_cluster: str = "edge",
        method: str = "DeltaAggregatedResources",
    ) -> None:  # fmt: skip
        super().__init__(port, method, discovery_pb2.DeltaDiscoveryResponse, node_id, node_cluster)

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
        self._queue(request, error, node)

    def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        self.send(response.type_url, nonce=response.nonce)

    def nack(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> None:
        self.send(response.type_url, nonce=response.nonce, error=message)
