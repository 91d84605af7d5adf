"""Envoy's reports, received on the xDS address: ``MetricsService`` and ``AccessLogService``.

Envoy's metrics service sink (``envoy.stat_sinks.metrics_service``) streams every stat at each
flush as Prometheus ``MetricFamily`` messages; the gRPC access logger
(``envoy.access_loggers.http_grpc``) streams access-log entries. Both are client streams that
Envoy keeps open and expects no answer on. This module decodes what the ``envoy`` provider reads
and hands it to a ``ReportSink``: the store itself (``aviary.metrics.envoy_reports``) in the
single process, a batching forwarder in a stream worker (``aviary.reports.forward``).

What Envoy 1.40 sends (checked against the real binary, ``emit_tags_as_labels: true``,
``report_counters_as_deltas: true``): the family ``cluster.upstream_rq_xx`` holds one counter per
cluster and response code class, labelled ``envoy.cluster_name`` and
``envoy.response_code_class`` ("2", "5"...), the value being the requests since the last flush.
(``cluster.external.upstream_rq_xx`` counts the same requests again and is not read.) The node's
identity comes only in a stream's first message. An access-log entry names the cluster in
``common_properties.upstream_cluster``, its status in ``response.response_code`` and its
duration (as ``%DURATION%``) in ``common_properties.time_to_last_downstream_tx_byte``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, TypeVar

import grpc
from envoy.service.accesslog.v3 import als_pb2

from aviary.reports.v1 import envoy_metrics_pb2

__all__ = [
    "ACCESS_LOG_SERVICE",
    "METRICS_SERVICE",
    "ReportSink",
    "counters_of",
    "report_handlers",
    "samples_of",
]

log = logging.getLogger("aviary.reports")

METRICS_SERVICE = "envoy.service.metrics.v3.MetricsService"
ACCESS_LOG_SERVICE = "envoy.service.accesslog.v3.AccessLogService"
RQ_XX = "cluster.upstream_rq_xx"
CLUSTER_LABEL = "envoy.cluster_name"
CLASS_LABEL = "envoy.response_code_class"


class ReportSink(Protocol):
    """Where decoded reports go: (cluster, code class, delta) counters and (cluster, ms, status) samples."""

    def add_counters(self, node_id: str, node_cluster: str, counts: Iterable[tuple[str, int, float]]) -> None: ...

    def add_samples(self, node_id: str, node_cluster: str, samples: Iterable[tuple[str, float, int]]) -> None: ...


def counters_of(message: envoy_metrics_pb2.StreamMetricsMessage) -> list[tuple[str, int, float]]:
    """The per-cluster request counters by code class in one metrics message."""
    counts: list[tuple[str, int, float]] = []
    for family in message.envoy_metrics:
        if family.name != RQ_XX:
            continue
        for metric in family.metric:
            cluster, code_class = "", ""
            for label in metric.label:
                if label.name == CLUSTER_LABEL:
                    cluster = label.value
                elif label.name == CLASS_LABEL:
                    code_class = label.value
            if cluster and code_class.isdigit() and metric.counter.value > 0:
                counts.append((cluster, int(code_class), metric.counter.value))
    return counts


def samples_of(message: als_pb2.StreamAccessLogsMessage) -> list[tuple[str, float, int]]:
    """(cluster, duration ms, status) of every HTTP entry of one access-log message that names a cluster."""
    samples: list[tuple[str, float, int]] = []
    for entry in message.http_logs.log_entry:
        common = entry.common_properties
        if not common.upstream_cluster:
            continue
        duration = common.time_to_last_downstream_tx_byte
        millis = duration.seconds * 1000.0 + duration.nanos / 1e6
        samples.append((common.upstream_cluster, millis, entry.response.response_code.value))
    return samples


_Message = TypeVar("_Message", envoy_metrics_pb2.StreamMetricsMessage, als_pb2.StreamAccessLogsMessage)


async def _with_sender(requests: AsyncIterator[_Message]) -> AsyncIterator[tuple[str, str, _Message]]:
    """Each message of a report stream with its sender's node id and cluster. Envoy names the node
    only in a stream's first message (``identifier``); messages before any identifier are dropped."""
    node_id, node_cluster = "", ""
    async for message in requests:
        if message.HasField("identifier"):
            node_id, node_cluster = message.identifier.node.id, message.identifier.node.cluster
        if node_id:
            yield node_id, node_cluster, message


class _Ingest:
    def __init__(self, sink: ReportSink) -> None:
        self._sink = sink

    async def stream_metrics(self, requests: AsyncIterator[envoy_metrics_pb2.StreamMetricsMessage],
                             context: Any) -> envoy_metrics_pb2.StreamMetricsResponse:
        async for node_id, node_cluster, message in _with_sender(requests):
            self._sink.add_counters(node_id, node_cluster, counters_of(message))
        return envoy_metrics_pb2.StreamMetricsResponse()

    async def stream_access_logs(self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage],
                                 context: Any) -> als_pb2.StreamAccessLogsResponse:
        async for node_id, node_cluster, message in _with_sender(requests):
            self._sink.add_samples(node_id, node_cluster, samples_of(message))
        return als_pb2.StreamAccessLogsResponse()


def report_handlers(sink: ReportSink) -> tuple[grpc.GenericRpcHandler, ...]:
    """The two services as generic handlers for a grpc.aio server, feeding ``sink``."""
    ingest = _Ingest(sink)
    metrics = grpc.method_handlers_generic_handler(METRICS_SERVICE, {
        "StreamMetrics": grpc.stream_unary_rpc_method_handler(
            ingest.stream_metrics,
            request_deserializer=envoy_metrics_pb2.StreamMetricsMessage.FromString,
            response_serializer=envoy_metrics_pb2.StreamMetricsResponse.SerializeToString),
    })
    access_logs = grpc.method_handlers_generic_handler(ACCESS_LOG_SERVICE, {
        "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
            ingest.stream_access_logs,
            request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString),
    })
    return metrics, access_logs
