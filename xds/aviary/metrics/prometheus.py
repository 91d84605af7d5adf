"""``MetricProvider`` over Prometheus' HTTP API (``/api/v1/query`` and ``/api/v1/query_range``)
via prometheus-api-client.

The client is synchronous (requests), so queries run on this provider's own small thread pool
(``WORKERS`` threads), each with the caller's timeout on the HTTP request (connect and every read)
and on the wait. A thread cannot be cancelled, so a hanging Prometheus must not make them pile up:

- at most one query of the same PromQL is in flight: asking again while the last one has no
  answer yet fails at once (the previous round's query is still hanging);
- at most ``MAX_IN_FLIGHT`` queries are accepted (running or queued); more fail at once;
- a queued query whose caller has given up is dropped before it is sent.

It does not retry: a failed query makes the round inconclusive and the next round comes
``checkEvery`` later anyway, while the library's default retries (with 1 s, 2 s backoff) would
hold a round for many seconds. Errors are one line naming Prometheus and the cause:
``Prometheus http://127.0.0.1:9090 unreachable: connection refused``, ``... timed out after 0.8s``;
an error answer quotes Prometheus' own message: ``... answered HTTP 400 (bad_data): 1:5: parse
error: unexpected end of input``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from aviary.metrics.provider import MetricProviderError, MetricQueryError

__all__ = [
    "MAX_IN_FLIGHT",
    "WORKERS",
    "PrometheusProvider",
    "error_message",
    "failure_cause",
    "scalar_from_result",
    "series_from_result",
    "timed_series_from_result",
]

_MAX_MESSAGE = 300
WORKERS = 8
"""Threads per Prometheus: queries of one round run at once, up to this many."""
MAX_IN_FLIGHT = 64
"""Queries per Prometheus accepted but not answered yet (running or queued); more fail at once."""
_GRACE = 0.2  # seconds the wait outlasts the HTTP timeout, so the thread's own error wins


def scalar_from_result(result: Any) -> float | None:
    """One number from the ``data.result`` of an instant query; None for an empty vector.

    A vector must hold at most one sample (aggregate with ``sum`` in custom queries); a scalar
    result is ``[time, "value"]``. Prometheus writes NaN and infinities as "NaN", "+Inf", "-Inf".
    """
    if isinstance(result, Sequence) and not isinstance(result, str | bytes):
        if len(result) == 2 and isinstance(result[0], int | float) and isinstance(result[1], str):
            return _number(result[1])
        if not result:
            return None
        if len(result) > 1:
            labels = ", ".join(str(sample.get("metric", {})) if isinstance(sample, dict) else "?"
                               for sample in result[:3])
            raise MetricQueryError(f"query returned {len(result)} series, expected one (use sum): {labels}")
        sample = result[0]
        if isinstance(sample, dict):
            value = sample.get("value")
            if isinstance(value, Sequence) and len(value) == 2 and isinstance(value[1], str):
                return _number(value[1])
    raise MetricQueryError(f"unexpected query result: {_short(repr(result))}")


def series_from_result(result: Any) -> tuple[float, ...]:
    """The samples of a range query's ``data.result`` (a matrix), in time order; () for no series.

    Like ``scalar_from_result``, at most one series (aggregate with ``sum``).
    """
    return tuple(value for _, value in timed_series_from_result(result))


def timed_series_from_result(result: Any) -> tuple[tuple[float, float], ...]:
    """``series_from_result`` with each sample's time (unix seconds): what ``aviary record`` keeps."""
    if not isinstance(result, Sequence) or isinstance(result, str | bytes):
        raise MetricQueryError(f"unexpected range query result: {_short(repr(result))}")
    if not result:
        return ()
    if len(result) > 1:
        labels = ", ".join(str(series.get("metric", {})) if isinstance(series, dict) else "?" for series in result[:3])
        raise MetricQueryError(f"query returned {len(result)} series, expected one (use sum): {labels}")
    series = result[0]
    values = series.get("values") if isinstance(series, dict) else None
    if not isinstance(values, Sequence) or not all(isinstance(v, Sequence) and len(v) == 2 for v in values):
        raise MetricQueryError(f"unexpected range query result: {_short(repr(result))}")
    return tuple((float(moment), _number(str(value))) for moment, value in values)


_STATUS = re.compile(r"^HTTP Status Code (\d+) \((b'.*'|b\".*\")\)$", re.DOTALL)


def error_message(exc: Exception) -> str:
    """Prometheus' own words from prometheus-api-client's exception for a non-200 answer.

    The library puts the raw body in its message (``HTTP Status Code 400 (b'{"status":"error",
    "errorType":"bad_data","error":"..."}')``); Prometheus' JSON error becomes ``HTTP 400
    (bad_data): <error>``, any other body is quoted as text.
    """
    text = str(exc)
    match = _STATUS.match(text)
    if match is None:
        return _short(text)
    status, literal = match.groups()
    try:
        body = ast.literal_eval(literal)
        answer = json.loads(body)
    except (ValueError, SyntaxError):
        try:
            shown = ast.literal_eval(literal).decode("utf-8", "replace").strip()
        except (ValueError, SyntaxError):
            shown = literal
        return f"HTTP {status}: {_short(shown)}" if shown else f"HTTP {status}"
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        kind = answer.get("errorType")
        return f"HTTP {status}{f' ({kind})' if isinstance(kind, str) and kind else ''}: {_short(answer['error'])}"
    return f"HTTP {status}: {_short(json.dumps(answer))}"


def _number(text: str) -> float:
    try:
        return float(text)  # accepts "NaN", "+Inf", "-Inf"
    except ValueError:
        raise MetricQueryError(f"not a number: {_short(text)!r}") from None


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


@dataclass(frozen=True, slots=True)
class _Range:
    """The span of a range query: from ``start`` to ``end`` at one sample every ``step``."""

    start: datetime
    end: datetime
    step: str


class PrometheusProvider:
    """Instant queries against the Prometheus at ``url``; ``timeout`` seconds per query at most."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        # requests takes float seconds; the library annotates its timeouts as int.
        self._client = PrometheusConnect(url=self.url, disable_ssl=True, retry=Retry(total=0, redirect=0),
                                         timeout=timeout)  # type: ignore[arg-type]
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="prometheus-query")
        self._in_flight: set[str] = set()  # PromQL sent (or queued) whose thread has not returned

    def __repr__(self) -> str:
        return f"Prometheus {self.url}"

    @property
    def in_flight(self) -> int:
        """Queries whose worker thread has not returned yet (running or queued)."""
        return len(self._in_flight)

    async def query_scalar(self, promql: str, timeout: float | None = None) -> float | None:
        return scalar_from_result(await self._run(promql, promql, timeout))

    async def query_series(self, promql: str, window: float, step: float,
                           timeout: float | None = None) -> tuple[float, ...]:
        """Samples of ``promql`` over the last ``window`` seconds, ``step`` seconds apart (query_range)."""
        if window <= 0 or step <= 0:
            raise MetricQueryError(f"window and step must be > 0, got {window:g}s and {step:g}s")
        end = datetime.now(UTC)
        start = end - timedelta(seconds=window)
        key = f"range {window:g}s/{step:g}s: {promql}"
        return series_from_result(await self._run(key, promql, timeout, _Range(start, end, f"{step:g}")))

    async def _run(self, key: str, promql: str, timeout: float | None, span: _Range | None = None) -> Any:
        """One query (instant, or over ``span``) on the pool, under the in-flight limits (by ``key``)."""
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        if key in self._in_flight:
            raise MetricProviderError(f"{self!r} has not answered the same query of the previous round yet")
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise MetricProviderError(f"{self!r} has {len(self._in_flight)} queries unanswered: not sending more")
        self._in_flight.add(key)
        deadline = time.monotonic() + limit
        extra = () if span is None else (span,)
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._query, promql, limit, deadline, *extra)
        future.add_done_callback(lambda done: self._finished(key, done))
        try:
            # shield: on timeout the thread runs on, and _in_flight must keep it until it returns.
            return await asyncio.wait_for(asyncio.shield(future), limit + _GRACE)
        except TimeoutError:
            raise MetricProviderError(f"{self!r} timed out after {limit:g}s") from None

    def _finished(self, key: str, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(key)
        if not future.cancelled():
            future.exception()  # retrieved: an abandoned query's error is not "never retrieved"

    def _query(self, promql: str, timeout: float, deadline: float, span: _Range | None = None) -> Any:
        if time.monotonic() >= deadline:  # queued behind hanging queries until its caller gave up
            raise MetricProviderError(f"{self!r} timed out after {timeout:g}s (all {WORKERS} connections busy)")
        try:
            # requests takes float seconds; the library annotates its timeouts as int.
            if span is None:
                return self._client.custom_query(promql, timeout=timeout)  # type: ignore[arg-type]
            return self._client.custom_query_range(promql, start_time=span.start, end_time=span.end, step=span.step,
                                                   timeout=timeout)  # type: ignore[arg-type]
        except PrometheusApiClientException as exc:
            raise MetricProviderError(f"{self!r} answered {error_message(exc)}") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            # A 200 whose body is not Prometheus JSON (requests' JSONDecodeError subclasses json's).
            raise MetricProviderError(f"{self!r} sent a malformed answer: {exc!r}") from exc
        except OSError as exc:  # requests.RequestException is an OSError: refused, reset, timed out
            raise MetricProviderError(f"{self!r} {failure_cause(exc, timeout)}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def failure_cause(exc: BaseException, timeout: float) -> str:
    """What went wrong, in a few words, from the chain requests -> urllib3 -> socket."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, TimeoutError) or type(e).__name__.endswith("TimeoutError") for e in chain):
        return f"timed out after {timeout:g}s"
    for error in chain:
        if isinstance(error, ConnectionRefusedError):
            return "unreachable: connection refused"
        if isinstance(error, socket.gaierror):
            return f"unreachable: cannot resolve its host ({error.strerror or error})"
        if isinstance(error, ConnectionResetError):
            return "closed the connection (reset)"
    for error in reversed(chain):
        if isinstance(error, OSError) and error.strerror:
            return f"unreachable: {error.strerror[0].lower()}{error.strerror[1:]}"
    return f"could not be queried: {_short(str(exc))}"
