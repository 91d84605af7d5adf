"""``MetricProvider`` over Prometheus' HTTP API (``/api/v1/query``) via prometheus-api-client.

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
``Prometheus http://127.0.0.1:9090 unreachable: connection refused``, ``... timed out after 0.8s``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from aviary.metrics.provider import MetricProviderError, MetricQueryError

__all__ = ["MAX_IN_FLIGHT", "WORKERS", "PrometheusProvider", "scalar_from_result"]

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


def _number(text: str) -> float:
    try:
        return float(text)  # accepts "NaN", "+Inf", "-Inf"
    except ValueError:
        raise MetricQueryError(f"not a number: {_short(text)!r}") from None


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


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
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        if promql in self._in_flight:
            raise MetricProviderError(f"{self!r} has not answered the same query of the previous round yet")
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise MetricProviderError(f"{self!r} has {len(self._in_flight)} queries unanswered: not sending more")
        self._in_flight.add(promql)
        deadline = time.monotonic() + limit
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._query, promql, limit, deadline)
        future.add_done_callback(lambda done: self._finished(promql, done))
        try:
            # shield: on timeout the thread runs on, and _in_flight must keep it until it returns.
            result = await asyncio.wait_for(asyncio.shield(future), limit + _GRACE)
        except TimeoutError:
            raise MetricProviderError(f"{self!r} timed out after {limit:g}s") from None
        return scalar_from_result(result)

    def _finished(self, promql: str, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(promql)
        if not future.cancelled():
            future.exception()  # retrieved: an abandoned query's error is not "never retrieved"

    def _query(self, promql: str, timeout: float, deadline: float) -> Any:
        if time.monotonic() >= deadline:  # queued behind hanging queries until its caller gave up
            raise MetricProviderError(f"{self!r} timed out after {timeout:g}s (all {WORKERS} connections busy)")
        try:
            return self._client.custom_query(promql, timeout=timeout)  # type: ignore[arg-type]
        except PrometheusApiClientException as exc:
            raise MetricProviderError(f"{self!r} answered {_short(str(exc))}") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            # A 200 whose body is not Prometheus JSON (requests' JSONDecodeError subclasses json's).
            raise MetricProviderError(f"{self!r} sent a malformed answer: {exc!r}") from exc
        except OSError as exc:  # requests.RequestException is an OSError: refused, reset, timed out
            raise MetricProviderError(f"{self!r} {_cause(exc, timeout)}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _cause(exc: BaseException, timeout: float) -> str:
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
