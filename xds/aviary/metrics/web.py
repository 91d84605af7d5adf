"""The ``web`` provider: HTTP GET of a JSON document, a JSONPath picks the number(s).

Like Argo Rollouts' web metric. A query is ``URL#JSONPATH`` (the check's ``web: {url, jsonPath}``
rendered): the fragment never goes to the server, so the pair travels as one string through the
same seam as PromQL. ``query_scalar`` wants the path to select exactly one number (a JSON number,
a numeric string, or null for no data); ``query_series`` takes every number it selects (an array
selected as a whole counts element by element).

Errors are one line naming the URL and the cause, and make the check INCONCLUSIVE:
``web GET http://127.0.0.1:8080/stats answered HTTP 503: down for maintenance``, ``... timed out
after 0.8s``, ``... unreachable: connection refused``, ``... not JSON: ...``, ``$.rate selected
nothing`` is no data. Like the Prometheus provider, requests run on a small thread pool (urllib
is synchronous), a query still hanging from the previous round is not sent again, and at most
``MAX_IN_FLIGHT`` are accepted.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aviary.metrics.jsonpath import JsonPathError, evaluate
from aviary.metrics.provider import MetricProviderError, MetricQueryError

__all__ = ["MAX_BODY", "MAX_IN_FLIGHT", "WORKERS", "WebProvider", "split_query"]

WORKERS = 4
MAX_IN_FLIGHT = 32
MAX_BODY = 1 << 20
"""Bytes of an answer read at most: a metrics endpoint answers a few hundred."""
_GRACE = 0.2
_MAX_MESSAGE = 200


def split_query(query: str) -> tuple[str, str]:
    """``URL#JSONPATH`` -> (URL, JSONPATH); the JSONPath defaults to ``$`` (the whole document)."""
    url, _, path = query.partition("#")
    return url, path or "$"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise MetricQueryError(f"{where} selected {_short(json.dumps(value))}, not a number")


class WebProvider:
    """GETs JSON over HTTP(S); ``timeout`` seconds per request at most (the caller's may be lower)."""

    def __init__(self, timeout: float = 5.0, headers: dict[str, str] | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self.headers = {"Accept": "application/json", "User-Agent": "aviary", **(headers or {})}
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="web-metric")
        self._in_flight: set[str] = set()

    def __repr__(self) -> str:
        return "web"

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def query_scalar(self, query: str, timeout: float | None = None) -> float | None:
        url, path = split_query(query)
        selected = await self._select(query, timeout)
        where = f"web GET {url}: {path}"
        if not selected:
            return None
        if len(selected) > 1:
            raise MetricQueryError(f"{where} selected {len(selected)} values, expected one")
        return _number(selected[0], where)

    async def query_series(self, query: str, window: float = 0.0, step: float = 0.0,
                           timeout: float | None = None) -> tuple[float, ...]:
        """Every number the path selects (``window``/``step`` do not apply: the document is the series)."""
        url, path = split_query(query)
        where = f"web GET {url}: {path}"
        values: list[float] = []
        for value in await self._select(query, timeout):
            items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            values.extend(math.nan if number is None else number for number in (_number(v, where) for v in items))
        return tuple(values)

    async def _select(self, query: str, timeout: float | None) -> list[Any]:
        url, path = split_query(query)
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        if query in self._in_flight:
            raise MetricProviderError(f"web GET {url} has not answered the same query of the previous round yet")
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise MetricProviderError(f"web provider has {len(self._in_flight)} requests unanswered: not sending more")
        self._in_flight.add(query)
        deadline = time.monotonic() + limit
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._get, url, limit, deadline)
        future.add_done_callback(lambda done: self._finished(query, done))
        try:
            document = await asyncio.wait_for(asyncio.shield(future), limit + _GRACE)
        except TimeoutError:
            raise MetricProviderError(f"web GET {url} timed out after {limit:g}s") from None
        try:
            return evaluate(path, document)
        except JsonPathError as exc:
            raise MetricQueryError(str(exc)) from exc

    def _finished(self, query: str, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(query)
        if not future.cancelled():
            future.exception()

    def _get(self, url: str, timeout: float, deadline: float) -> Any:
        where = f"web GET {url}"
        if time.monotonic() >= deadline:
            raise MetricProviderError(f"{where} timed out after {timeout:g}s (all {WORKERS} connections busy)")
        request = urllib.request.Request(url, headers=self.headers, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            detail = _short(exc.read(_MAX_MESSAGE).decode("utf-8", "replace")) if exc.fp is not None else ""
            raise MetricProviderError(f"{where} answered HTTP {exc.code}{': ' + detail if detail else ''}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise MetricProviderError(f"{where} {_cause(exc, timeout)}") from exc
        if len(body) > MAX_BODY:
            raise MetricQueryError(f"{where} answered more than {MAX_BODY:,} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MetricQueryError(f"{where} answered something that is not JSON: {_short(repr(body[:80]))}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _cause(exc: BaseException, timeout: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g}s"
    if isinstance(reason, ConnectionRefusedError):
        return "unreachable: connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unreachable: cannot resolve its host ({reason.strerror or reason})"
    if isinstance(reason, ConnectionResetError):
        return "closed the connection (reset)"
    return f"failed: {_short(str(reason))}"
