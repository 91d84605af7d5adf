"""The event loop `aviary serve` runs on, in the engine process and in each xDS worker: uvloop.

Measured with `make bench` (tests/bench/fanout.py, 1,000 and 5,000 Envoy-like streams, two
workers, the same code side by side): about 6 % less server CPU per weight change than asyncio's
own loop, most of it in the workers (less event-loop overhead per stream wake-up and write);
change latency about the same. grpc.aio runs on any asyncio loop. ``AVIARY_UVLOOP=0`` in the
environment keeps asyncio's loop (to rule the loop out when chasing a problem); so does a
platform uvloop is not installed on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop, unless AVIARY_UVLOOP=0 or uvloop is not installed."""
    if os.environ.get("AVIARY_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
