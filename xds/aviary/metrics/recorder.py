"""``aviary record``: fetch what a policy's checks would query from Prometheus, into a recording.

Each planned query (``aviary.metrics.planned_queries``) is fetched as range queries over the span,
at one point per ``step`` (the scrape interval), through prometheus-api-client, a few at a time.
Prometheus refuses more than 11,000 points per range query, so long spans go in chunks. The span
starts early by the policy's look-back (the judge's samples reach back ``maxWindow`` before a
round), so that the first simulated round sees what a live one would have.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from aviary.metrics.planned_queries import PlannedQuery, look_back, planned_queries
from aviary.metrics.prometheus import error_message, failure_cause, timed_series_from_result
from aviary.metrics.provider import MetricQueryError
from aviary.metrics.recording import Provenance, RecordedSeries, Recording, utc_text
from aviary.policy.schema import Rollout

__all__ = ["CHUNK_POINTS", "RecordError", "RecordRequest", "record"]

CHUNK_POINTS = 10_000
"""Points per range query (Prometheus refuses more than 11,000)."""
_PARALLEL = 4
_TIMEOUT = 30.0


class RecordError(Exception):
    """Prometheus could not answer a query; the message names Prometheus, the query and the cause."""


@dataclass(frozen=True, slots=True)
class RecordRequest:
    prometheus: str
    rollout: Rollout
    policy_file: str
    canary: str
    stable: str
    start: float
    end: float
    step: float
    aviary_version: str


def record(request: RecordRequest) -> tuple[Recording, list[str]]:
    """The recording, and one line per query that had no data at all in the span (not an error:
    a canary without traffic yet has none; the simulation then sees no data, as live rounds did)."""
    spec = request.rollout.spec
    planned = [query for query in planned_queries(request.rollout.name, spec, request.canary, request.stable)
               if query.source == "prometheus"]
    start = request.start - look_back(spec)
    client = PrometheusConnect(url=request.prometheus.rstrip("/"), disable_ssl=True,
                               retry=Retry(total=0, redirect=0), timeout=_TIMEOUT)  # type: ignore[arg-type]
    try:
        with ThreadPoolExecutor(_PARALLEL, thread_name_prefix="record") as pool:
            fetched = list(pool.map(lambda q: _fetch(client, request, q, start), planned))
    finally:
        client.close()
    series = {item.query: item for item in fetched}
    empty = [f"no data for {', '.join(item.uses)} from {utc_text(start)} to {utc_text(request.end)}: {item.query}"
             for item in fetched if not item.times]
    provenance = Provenance(request.prometheus, start, request.end, request.step, request.rollout.name,
                            request.canary, request.stable, request.policy_file, time.time(), request.aviary_version,
                            request.start)
    return Recording(provenance, series), empty


def _fetch(client: PrometheusConnect, request: RecordRequest, planned: PlannedQuery, start: float) -> RecordedSeries:
    times: list[float] = []
    values: list[float] = []
    chunk = request.step * CHUNK_POINTS
    begin = start
    while begin <= request.end:
        until = min(request.end, begin + chunk - request.step)
        for moment, value in _range(client, request, planned.query, begin, until):
            if not times or moment > times[-1]:
                times.append(moment)
                values.append(value)
        begin = until + request.step
    return RecordedSeries(planned.query, tuple(times), tuple(values), planned.uses)


def _range(client: PrometheusConnect, request: RecordRequest, query: str, start: float,
           end: float) -> list[tuple[float, float]]:
    try:
        # The client rounds start and end to whole seconds; ``params`` (sent after them) keeps the
        # milliseconds, so the points fall where the rounds of a replay from ``--from`` fall.
        exact = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
        result = client.custom_query_range(query, start_time=datetime.fromtimestamp(start, UTC),
                                           end_time=datetime.fromtimestamp(end, UTC), step=f"{request.step:g}",
                                           params=exact, timeout=_TIMEOUT)  # type: ignore[arg-type]
    except PrometheusApiClientException as exc:
        raise RecordError(f"Prometheus {request.prometheus} answered {error_message(exc)} to {query!r}") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RecordError(f"Prometheus {request.prometheus} sent a malformed answer to {query!r}: {exc!r}") from exc
    except OSError as exc:  # requests.RequestException is an OSError
        raise RecordError(f"Prometheus {request.prometheus} {failure_cause(exc, _TIMEOUT)}") from exc
    try:
        return list(timed_series_from_result(result))
    except MetricQueryError as exc:
        raise RecordError(f"Prometheus {request.prometheus} answered {query!r} with {exc}") from exc
