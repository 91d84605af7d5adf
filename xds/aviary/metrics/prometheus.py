"""``MetricProvider`` over Prometheus' HTTP API (``/api/v1/query``) via prometheus-api-client.

The client is synchronous (requests), so each query runs in a worker thread with a timeout on
both the HTTP request and the wait. It does not retry: a failed query makes the round
inconclusive and the next round comes ``checkEvery`` later anyway, while the library's default
retries (with 1 s, 2 s backoff) would hold a round for many seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from aviary.metrics.provider import MetricProviderError, MetricQueryError

__all__ = ["PrometheusProvider", "scalar_from_result"]

_MAX_MESSAGE = 300


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
    """Instant queries against the Prometheus at ``url``; ``timeout`` seconds per query."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        # requests takes float seconds; the library annotates its timeouts as int.
        self._client = PrometheusConnect(url=self.url, disable_ssl=True, retry=Retry(total=0, redirect=0),
                                         timeout=timeout)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"PrometheusProvider({self.url!r}, timeout={self.timeout})"

    async def query_scalar(self, promql: str) -> float | None:
        try:
            # The HTTP timeout bounds the thread; the outer one also covers a slow body or DNS.
            result = await asyncio.wait_for(asyncio.to_thread(self._query, promql), self.timeout + 1.0)
        except TimeoutError as exc:
            raise MetricProviderError(f"Prometheus at {self.url} did not answer within {self.timeout:g}s") \
                from exc
        return scalar_from_result(result)

    def _query(self, promql: str) -> Any:
        try:
            return self._client.custom_query(promql, timeout=self.timeout)  # type: ignore[arg-type]
        except PrometheusApiClientException as exc:
            raise MetricProviderError(f"Prometheus at {self.url} answered {_short(str(exc))}") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            # A 200 whose body is not Prometheus JSON (requests' JSONDecodeError subclasses json's).
            raise MetricProviderError(f"Prometheus at {self.url} sent a malformed answer: {exc!r}") from exc
        except OSError as exc:  # requests.RequestException is an OSError: refused, reset, timed out
            reason = f"Prometheus at {self.url} could not be queried: {_short(str(exc))}"
            raise MetricProviderError(reason) from exc

    def close(self) -> None:
        self._client.close()
