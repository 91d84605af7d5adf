"""Poll-with-deadline helpers: the only way the rig waits for anything."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Exceptions raised by the predicate count as "not yet"; the last one is chained to the
    TimeoutError raised when ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_value, last_exc = value, None
        except Exception as exc:
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what} ({detail})") from last_exc
        time.sleep(min(interval, remaining))


@overload
async def async_wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T: ...


@overload
async def async_wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T: ...


async def async_wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Async twin of :func:`wait_until`; ``predicate`` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            result = predicate()
            value = await result if inspect.isawaitable(result) else result
            if value:
                return value
            last_value, last_exc = value, None
        except Exception as exc:
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what} ({detail})") from last_exc
        await asyncio.sleep(min(interval, remaining))
