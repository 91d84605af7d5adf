"""The store of what proxies report (``aviary.metrics.envoy_reports``) and the decoding of the
messages Envoy sends (``aviary.reports.ingest``), and their trip through a stream worker."""

from __future__ import annotations

import asyncio
import itertools
import math

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from aviary.discovery.worker_main import HEADER
from aviary.discovery.worker_protocol import Reports, decode_from_worker, reports_message
from aviary.metrics.envoy_reports import SLOT_SECONDS, EnvoyReports, percentile
from aviary.reports.forward import Batch, ReportForwarder
from aviary.reports.ingest import counters_of, samples_of
from aviary.reports.v1 import envoy_metrics_pb2 as pb


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counters_are_summed_over_proxies_within_the_window() -> None:
    clock = Clock()
    store = EnvoyReports(clock)
    store.add_counters("envoy-1", "edge", [("shop-v2", 2, 10), ("shop-v2", 5, 3)])
    store.add_counters("envoy-2", "edge", [("shop-v2", 2, 5)])
    clock.now += 10
    store.add_counters("envoy-1", "edge", [("shop-v2", 5, 1), ("shop-v1", 2, 7)])
    both = store.counts("shop-v2", clock.now - 30, clock.now)
    assert (both.of_class(2), both.of_class(5), both.total) == (15, 4, 19)
    recent = store.counts("shop-v2", clock.now - 5, clock.now)
    assert (recent.of_class(2), recent.of_class(5)) == (0, 1)
    assert store.counts("unknown", 0, clock.now).total == 0


def test_the_counter_ring_keeps_only_the_horizon() -> None:
    clock = Clock()
    store = EnvoyReports(clock, horizon=10)
    for _ in range(100):
        store.add_counters("envoy-1", "edge", [("c", 2, 1)])
        clock.now += 1
    assert store.counts("c", 0, clock.now).total <= 10 + SLOT_SECONDS * 4
    assert len(store._clusters["c"].slots) <= 10 / SLOT_SECONDS + 2


def test_samples_are_bounded_per_second_and_in_total() -> None:
    clock = Clock()
    store = EnvoyReports(clock, max_samples=50, samples_per_second=20)
    store.add_samples("envoy-1", "edge", [("c", float(i), 200) for i in range(30)])
    assert len(store.durations("c", clock.now - 1, clock.now)) == 20
    assert store.dropped_samples("c") == 10
    for _ in range(5):
        clock.now += 1
        store.add_samples("envoy-1", "edge", [("c", 30.0, 200)] * 20)
    assert len(store.durations("c", 0, clock.now)) == 50  # the last 50 only
    assert store.durations("c", clock.now - 0.5, clock.now) == [30.0] * 20


def test_clusters_and_proxies_are_bounded() -> None:
    clock = Clock()
    store = EnvoyReports(clock, max_clusters=3, max_proxies=2)
    for i in range(5):
        store.add_counters(f"envoy-{i}", "edge", [(f"c{i}", 2, 1)])
    assert [p.node_id for p in store.proxies()] == ["envoy-3", "envoy-4"]
    assert store.counts("c0", 0, clock.now).total == 0 and store.counts("c4", 0, clock.now).total == 1


def test_percentile_is_exact_between_ranks() -> None:
    assert percentile([30.0] * 99 + [45.0], 0.5) == 30.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert math.isnan(percentile([], 0.99))


def _family(name: str, *metrics: tuple[str, str, float]) -> pb.MetricFamily:
    return pb.MetricFamily(name=name, type=0, metric=[
        pb.Metric(label=[pb.LabelPair(name="envoy.response_code_class", value=code),
                         pb.LabelPair(name="envoy.cluster_name", value=cluster)],
                  counter=pb.Counter(value=value)) for cluster, code, value in metrics])


def test_counters_of_reads_the_code_class_counters_only() -> None:
    message = pb.StreamMetricsMessage(envoy_metrics=[
        _family("cluster.upstream_rq_xx", ("shop-v2", "2", 8), ("shop-v2", "5", 2), ("shop-v1", "2", 0)),
        _family("cluster.external.upstream_rq_xx", ("shop-v2", "2", 8)),
        _family("cluster.upstream_rq_completed", ("shop-v2", "", 10)),
    ])
    assert counters_of(message) == [("shop-v2", 2, 8.0), ("shop-v2", 5, 2.0)]


def test_samples_of_reads_cluster_status_and_duration() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(
            upstream_cluster="shop-v2", time_to_last_downstream_tx_byte=duration_pb2.Duration(nanos=45_500_000)),
        response=accesslog_pb2.HTTPResponseProperties(response_code=wrappers_pb2.UInt32Value(value=503)))
    no_cluster = accesslog_pb2.HTTPAccessLogEntry()
    message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(node=base_pb2.Node(id="envoy-1"), log_name="aviary"),
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry, no_cluster]))
    assert samples_of(message) == [("shop-v2", 45.5, 503)]


def test_a_worker_batch_reaches_the_engine_store_unchanged() -> None:
    sent: list[Batch] = []

    async def collect() -> None:
        forwarder = ReportForwarder(sent.append)
        forwarder.add_counters("envoy-1", "edge", [("shop-v2", 5, 3.0)])
        forwarder.add_samples("envoy-1", "edge", [("shop-v2", 45.0, 500)])
        forwarder.add_samples("envoy-2", "edge", [])  # nothing to send
        await asyncio.sleep(0)  # the batch leaves at the end of the loop's turn

    asyncio.run(collect())
    [batch] = sent
    payload = reports_message(batch)[HEADER.size:]
    decoded = decode_from_worker(payload)
    assert isinstance(decoded, Reports)
    clock = Clock()
    store = EnvoyReports(clock)
    for node_id, node_cluster, counts in decoded.batch[0]:
        store.add_counters(node_id, node_cluster, counts)
    for node_id, node_cluster, samples in decoded.batch[1]:
        store.add_samples(node_id, node_cluster, samples)
    assert store.counts("shop-v2", 0, clock.now).of_class(5) == 3
    assert store.durations("shop-v2", 0, clock.now) == [45.0]


def test_proxies_show_when_they_last_reported() -> None:
    import io
    import time

    from rich.console import Console

    from aviary.admin import convert, render
    from aviary.discovery.proxy_status import ProxyView

    store = EnvoyReports(time.time)
    store.add_counters("envoy-1", "edge", [("c", 2, 1)])
    reporting = convert.proxy_message(ProxyView(1, "envoy-1", "edge", "ipv4:127.0.0.1:1", time.time()),
                                      store.proxy("envoy-1"))
    silent = convert.proxy_message(ProxyView(2, "envoy-2", "edge", "ipv4:127.0.0.1:2", time.time()),
                                   store.proxy("envoy-2"))
    assert reporting.HasField("metrics_reported") and not reporting.HasField("access_log_reported")
    assert not silent.HasField("metrics_reported")
    out = io.StringIO()
    Console(file=out, width=250).print(render.proxies_table([reporting, silent]))
    lines = out.getvalue().splitlines()
    assert "REPORTS" in lines[0]
    assert "metrics 0.0s ago" in lines[1] and lines[2].rstrip().endswith("none")
    line = render.reports_line([reporting, silent])
    assert line is not None and line.plain == "Envoy reports: 1 of 2 proxies (not reporting: envoy-2)"
    assert render.reports_line([silent]) is None  # no sink anywhere: nothing to say
    late = render.reports_line([reporting], now=time.time() + 60)
    assert late is not None and late.plain == "Envoy reports: 0 of 1 proxies (not reporting: envoy-1)"


def test_a_cluster_keeps_its_own_sample_budget() -> None:
    clock = Clock()
    store = EnvoyReports(clock, samples_per_second=20)
    store.keep("canary", 5)
    store.add_samples("envoy-1", "edge", [("canary", 1.0, 200)] * 10 + [("other", 1.0, 200)] * 10)
    assert len(store.durations("canary", 0, clock.now)) == 5 and store.dropped_samples("canary") == 5
    assert len(store.durations("other", 0, clock.now)) == 10


def test_series_in_one_pass_match_interval_by_interval() -> None:
    clock = Clock()
    store = EnvoyReports(clock)
    for second in range(120):
        clock.now += 0.5
        store.add_counters("envoy-1", "edge", [("c", 2, second % 7 + 1), ("c", 5, second % 3)])
        store.add_samples("envoy-1", "edge", [("c", float(second), 200), ("c", float(second) + 0.5, 500)])
    edges = [clock.now - 60 + 3 * i for i in range(21)]
    counts, durations = store.count_series("c", edges), store.duration_series("c", edges)
    assert counts == [store.counts("c", a, b) for a, b in itertools.pairwise(edges)]
    assert durations == [store.durations("c", a, b) for a, b in itertools.pairwise(edges)]
    assert sum(c.total for c in counts) == store.counts("c", edges[0], edges[-1]).total > 0
