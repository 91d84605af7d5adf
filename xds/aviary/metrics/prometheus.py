"""``MetricProvider`` over Prometheus' HTTP API (``GET /api/v1/query``).

Queries run on the event loop (``aviary.metrics.http_client``: keep-alive connections, no threads),
each with the caller's timeout; one that times out is cancelled and its connection closed, so a
hanging Prometheus holds nothing once the round has given up on it. Still, a Prometheus that is
slow must not be asked ever more:

- at most one query of the same PromQL is in flight: asking it again while it has no answer yet
  fails at once;
- at most ``MAX_IN_FLIGHT`` queries are waiting or running; more fail at once; they share
  ``http_client.CONNECTIONS`` connections.

It does not retry: a failed query makes the round inconclusive and the next round comes
``checkEvery`` later anyway. Errors are one line naming Prometheus and the cause:
``Prometheus http://127.0.0.1:9090 unreachable: connection refused``, ``... timed out after 0.8s``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Sequence
from typing import Any

from aviary.metrics.http_client import KeepAliveClient, ProtocolError
from aviary.metrics.provider import MetricProviderError, MetricQueryError

__all__ = ["MAX_IN_FLIGHT", "PrometheusProvider", "scalar_from_result"]

_MAX_MESSAGE = 300
MAX_IN_FLIGHT = 10_000
"""Queries per Prometheus asked and not answered yet (sent, or waiting for one of the client's
``CONNECTIONS``); more fail at once. A safety net: each rollout runs one round at a time, and a
round gives up on its queries after its timeout, so in flight stays below rollouts x queries."""


class HttpStatusError(Exception):
    """Prometheus answered with a status other than 200 (the cause of the provider's error)."""


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
        self._client = KeepAliveClient(self.url)
        self._in_flight: set[str] = set()  # PromQL sent and not answered (nor given up on) yet

    def __repr__(self) -> str:
        return f"Prometheus {self.url}"

    @property
    def in_flight(self) -> int:
        """Queries sent and not answered nor given up on yet."""
        return len(self._in_flight)

    async def query_scalar(self, promql: str, timeout: float | None = None) -> float | None:
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        if promql in self._in_flight:
            raise MetricProviderError(f"{self!r} has not answered the same query of the previous round yet")
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise MetricProviderError(f"{self!r} has {len(self._in_flight)} queries unanswered: not sending more")
        self._in_flight.add(promql)
        try:
            async with asyncio.timeout(limit):
                response = await self._client.get("/api/v1/query", {"query": promql})
        except TimeoutError:  # the limit, or the socket's own (an OSError too): either way, too slow
            raise MetricProviderError(f"{self!r} timed out after {limit:g}s") from None
        except ProtocolError as exc:
            raise MetricProviderError(f"{self!r} sent a malformed answer: {exc}") from exc
        except EOFError as exc:
            raise MetricProviderError(f"{self!r} closed the connection without a whole answer") from exc
        except OSError as exc:  # refused, reset, unresolvable host
            raise MetricProviderError(f"{self!r} {_cause(exc, limit)}") from exc
        finally:
            self._in_flight.discard(promql)
        if response.status != 200:
            text = f"HTTP Status Code {response.status} ({response.body!r})"
            raise MetricProviderError(f"{self!r} answered {_short(text)}") from HttpStatusError(text)
        try:
            result = json.loads(response.body)["data"]["result"]
        except (ValueError, KeyError, TypeError) as exc:  # not Prometheus JSON
            raise MetricProviderError(f"{self!r} sent a malformed answer: {exc!r}") from exc
        return scalar_from_result(result)

    def close(self) -> None:
        """Close idle connections (a query still running closes its own when it ends or is cancelled)."""
        self._client.close()


def _cause(exc: BaseException, timeout: float) -> str:
    """What went wrong, in a few words, from the exception chain down to the socket's error."""
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
