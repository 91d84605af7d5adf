"""The control plane's own Prometheus metrics, served on `--metrics-address`.

Counters and the push->ACK histogram are fed from proxy events as they happen; everything that
is a current state (connected proxies, rollout phase, weight, step, check values, applied commit)
is read at scrape time by a collector, so it can never drift from the engine's status.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from aviary.discovery import typeurls
from aviary.discovery.make_before_break import Stage
from aviary.discovery.proxy_events import (
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    ResponseSent,
)
from aviary.discovery.proxy_status import ProxyStatus
from aviary.listen import ListenError, split_address
from aviary.policy.analysis import CheckOutcome
from aviary.policy.rollout_state import Phase
from aviary.policy.schema import PolicyError
from aviary.policy.source import PolicyState
from aviary.runner import RolloutRunner

_Metric = TypeVar("_Metric", PromCounter, PromHistogram)


def _labelled(children: dict[str, _Metric], metric: _Metric, type_url: str) -> _Metric:
    """``metric.labels(short name of type_url)``, kept in ``children``."""
    child = children.get(type_url)
    if child is None:
        child = children[type_url] = metric.labels(typeurls.short_name(type_url))
    return child


PUSH_ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ControlPlaneMetrics:
    def __init__(self, proxies: ProxyStatus, runner: RolloutRunner) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise here
        self.registry = CollectorRegistry(auto_describe=True)
        self._responses = PromCounter(
            "aviary_xds_responses", "xDS responses sent, by type", ["type"], registry=self.registry
        )
        self._bytes = PromCounter(
            "aviary_xds_response_bytes", "Bytes of xDS responses sent, by type", ["type"], registry=self.registry
        )
        self._nacks = PromCounter("aviary_xds_nacks", "NACKs received, by type", ["type"], registry=self.registry)
        self._push_ack = PromHistogram(
            "aviary_xds_push_ack_seconds",
            "Time from sending a response to its ACK",
            ["type"],
            buckets=PUSH_ACK_BUCKETS,
            registry=self.registry,
        )
        self._reloads = PromCounter("aviary_policy_reloads", "Policy sets applied", registry=self.registry)
        self._rejections = PromCounter(
            "aviary_policy_rejections", "Policy loads that had rejected files or commits", registry=self.registry
        )
        self.registry.register(_StateCollector(proxies, runner))
        # type URL -> the metric's child labelled with its short name
        self._response_counts: dict[str, PromCounter] = {}
        self._byte_counts: dict[str, PromCounter] = {}
        self._push_acks: dict[str, PromHistogram] = {}
        self._nack_counts: dict[str, PromCounter] = {}
        proxies.subscribe(self.on_proxy_event)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def on_proxy_event(self, event: ProxyEvent) -> None:
        # Called for every response and every ACK of every proxy: each metric's labelled child is
        # looked up once per type (`labels()` takes a lock and builds a key on every call), and
        # made only when first needed, so a type that had no NACK has no NACK series, as before.
        if isinstance(event, ResponseSent):
            _labelled(self._response_counts, self._responses, event.type_url).inc(event.count)
            _labelled(self._byte_counts, self._bytes, event.type_url).inc(event.size)
        elif isinstance(event, ResourcesAcked):  # the streams report each response's ACK once
            _labelled(self._push_acks, self._push_ack, event.type_url).observe(max(0.0, event.at - event.sent_at))
        elif isinstance(event, ResourcesNacked):
            _labelled(self._nack_counts, self._nacks, event.type_url).inc()

    def policies_applied(self, errors: list[PolicyError]) -> None:
        self._reloads.inc()
        if errors:
            self._rejections.inc()

    def observe_policy_source(self, state: Callable[[], PolicyState]) -> None:
        """Export the policy source's fetch health (git), read from ``state()`` at scrape time."""
        self.registry.register(_PolicySourceCollector(state))

    def observe_xds_workers(
        self, streams: Callable[[], Mapping[int, int]], restarts: Callable[[], Mapping[str, int]]
    ) -> None:
        """Export the xDS worker processes (`--xds-workers N`): streams per worker, restarts by reason."""
        self.registry.register(_XdsWorkersCollector(streams, restarts))

    def serve(self, address: str) -> int:
        """Serve /metrics on HOST:PORT (port 0 picks one); returns the bound port.

        ``http.server`` sets SO_REUSEADDR only (no SO_REUSEPORT), so a busy port fails to bind:
        that is a ``ListenError`` here.
        """
        try:
            host, port = split_address(address)
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except ValueError as exc:
            raise ListenError("metrics", address, str(exc)) from None
        except OSError as exc:
            raise ListenError("metrics", address, (exc.strerror or str(exc)).lower()) from None
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _StateCollector(Collector):
    """Current state, read when scraped."""

    def __init__(self, proxies: ProxyStatus, runner: RolloutRunner) -> None:
        self._proxies = proxies
        self._runner = runner

    def collect(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "aviary_connected_proxies", "Connected xDS streams by node cluster", labels=["node_cluster"]
        )
        for cluster, count in sorted(Counter(p.node_cluster for p in self._proxies).items()):
            connected.add_metric([cluster], count)
        yield connected

        phase = GaugeMetricFamily(
            "aviary_rollout_phase", "1 for the phase a rollout is in", labels=["rollout", "phase"]
        )
        weight = GaugeMetricFamily("aviary_rollout_canary_weight", "Canary weight in percent", labels=["rollout"])
        step = GaugeMetricFamily("aviary_rollout_step", "Index of the current step", labels=["rollout"])
        mirror = GaugeMetricFamily(
            "aviary_rollout_mirror_percent", "Percent of the weighted split copied to the canary", labels=["rollout"]
        )
        value = GaugeMetricFamily(
            "aviary_check_value", "Last value of a metric check", labels=["rollout", "check"]
        )
        result = GaugeMetricFamily(
            "aviary_check_result", "1 for the last outcome of a metric check", labels=["rollout", "check", "result"]
        )
        cohort_open = GaugeMetricFamily(
            "aviary_rollout_cohort_open", "1 for each cohort opened to the canary", labels=["rollout", "cohort"]
        )
        stage = GaugeMetricFamily(
            "aviary_rollout_stage", "1 for the make-before-break stage of the rollout's plan",
            labels=["rollout", "stage"],
        )
        plan = InfoMetricFamily(
            "aviary_rollout_plan", "The traffic plan a rollout asks the proxies to serve", labels=["rollout"]
        )
        for name, status in sorted(self._runner.statuses().items()):
            for cohort in status.cohorts:
                cohort_open.add_metric([name, cohort], 1.0)
            current = self._runner.stage(name)
            if current is not None:
                for each in Stage:
                    stage.add_metric([name, each.value], 1.0 if each.value == current else 0.0)
            wanted = self._runner.plan(name)
            if wanted is not None:
                sticky = wanted.stickiness.describe() if wanted.stickiness is not None else ""
                plan.add_metric([name], {"digest": wanted.digest, "stickiness": sticky})
            for candidate in Phase:
                phase.add_metric([name, candidate.value], 1.0 if status.phase is candidate else 0.0)
            weight.add_metric([name], status.weight)
            step.add_metric([name], status.step_index)
            mirror.add_metric([name], status.mirror)
            for check in status.last_checks:
                if check.value is not None:
                    value.add_metric([name, check.name], check.value)
                for outcome in CheckOutcome:
                    result.add_metric([name, check.name, outcome.value], 1.0 if check.outcome is outcome else 0.0)
        yield from (phase, weight, step, mirror, cohort_open, stage, plan, value, result)

        commit = InfoMetricFamily("aviary_policy_git", "Git commit of the applied policies", labels=["commit"])
        if self._runner.revision:
            commit.add_metric([self._runner.revision], {})
        yield commit

        engine_errors = CounterMetricFamily(
            "aviary_engine_errors", "Errors the rollout engine hit and carried on after, by rollout", labels=["rollout"]
        )
        for name, count in sorted(self._runner.engine_error_counts().items()):
            engine_errors.add_metric([name], count)
        yield engine_errors
        writes = self._runner.state_writes
        yield GaugeMetricFamily(
            "aviary_state_writable",
            "1 while writes to the state file succeed; 0 while one fails (disk full, read-only): steps away "
            "from stable wait for it",
            value=1.0 if writes.writable else 0.0,
        )
        yield CounterMetricFamily(
            "aviary_state_write_errors", "Writes to the state file that failed, retries included",
            value=writes.errors_total,
        )
        reports = self._runner.envoy_reports
        received = CounterMetricFamily(
            "aviary_envoy_reports", "Reports proxies sent to Aviary's own services: metrics service messages, "
            "access-log entries (analysis.provider: envoy)", labels=["kind"])
        received.add_metric(["metrics"], reports.metrics_messages)
        received.add_metric(["access_log"], reports.samples_received)
        yield received


class _XdsWorkersCollector(Collector):
    """The live xDS worker processes, read when scraped."""

    def __init__(self, streams: Callable[[], Mapping[int, int]], restarts: Callable[[], Mapping[str, int]]) -> None:
        self._streams = streams
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        streams = GaugeMetricFamily("aviary_xds_worker_streams", "xDS streams held by each worker process "
                                    "(aviary serve --xds-workers)", labels=["worker"])
        for worker, count in sorted(self._streams().items()):
            streams.add_metric([str(worker)], count)
        yield streams
        restarts = CounterMetricFamily("aviary_xds_worker_restarts", "xDS worker processes replaced, by reason: "
                                       "exited (died), hung (stopped answering), not_listening (did not start)",
                                       labels=["reason"])
        for reason, count in sorted(self._restarts().items()):
            restarts.add_metric([reason], count)
        yield restarts


class _PolicySourceCollector(Collector):
    """Whether the git remote can be reached, read when scraped (0 for a directory of files)."""

    def __init__(self, state: Callable[[], PolicyState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield GaugeMetricFamily("aviary_policy_fetch_failing",
                                "1 while the policy repository cannot be fetched (see aviary status)",
                                value=1.0 if state.fetch_error else 0.0)
        yield CounterMetricFamily("aviary_policy_fetch_failures", "Policy polls that could not fetch the repository",
                                  value=state.fetch_failures)
