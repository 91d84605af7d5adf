"""The xDS counters and the push->ACK histogram of `ControlPlaneMetrics`, fed proxy events."""

from __future__ import annotations

from typing import cast

from aviary.discovery import typeurls
from aviary.discovery.proxy_events import ResourcesAcked, ResourcesNacked, ResponseSent
from aviary.discovery.proxy_status import ProxyStatus
from aviary.observability import ControlPlaneMetrics
from aviary.runner import RolloutRunner


class _Runner:
    revision = None

    class state_writes:  # an attribute the collector reads
        writable = True
        errors_total = 0

    class envoy_reports:  # the counts of Envoy's own reports (aviary_envoy_reports_total)
        metrics_messages = 0
        samples_received = 0

    def statuses(self) -> dict[str, object]:
        return {}

    def engine_error_counts(self) -> dict[str, int]:
        return {}


def test_responses_folded_by_a_worker_count_as_many_and_a_type_without_nacks_has_no_nack_series() -> None:
    proxies = ProxyStatus()
    metrics = ControlPlaneMetrics(proxies, cast(RolloutRunner, _Runner()))
    sample = metrics.registry.get_sample_value
    proxies.apply(ResponseSent(1, typeurls.ROUTE, 100))
    proxies.apply(ResponseSent(1 << 32 | 1, typeurls.ROUTE, 900, count=3))  # three responses, from a worker
    proxies.apply(ResponseSent(1, typeurls.CLUSTER, 50))
    for at in (0.002, 0.2):
        proxies.apply(ResourcesAcked(1, typeurls.ROUTE, "v", {}, 0.0, at))
    assert sample("aviary_xds_responses_total", {"type": "RDS"}) == 4
    assert sample("aviary_xds_response_bytes_total", {"type": "RDS"}) == 1000
    assert sample("aviary_xds_responses_total", {"type": "CDS"}) == 1
    assert sample("aviary_xds_push_ack_seconds_count", {"type": "RDS"}) == 2
    assert sample("aviary_xds_push_ack_seconds_bucket", {"type": "RDS", "le": "0.0025"}) == 1
    assert sample("aviary_xds_nacks_total", {"type": "RDS"}) is None  # no series until a NACK
    proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "v", {}, "bad", 0.0))
    proxies.apply(ResourcesNacked(1, typeurls.ROUTE, "v", {}, "bad", 0.0))
    assert sample("aviary_xds_nacks_total", {"type": "RDS"}) == 2
    assert sample("aviary_xds_nacks_total", {"type": "CDS"}) is None
