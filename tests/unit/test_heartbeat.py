"""The state heartbeat keeps the proxies a restarted plane still waits for.

Before: the first heartbeat after a restart wrote only the connected proxies (none yet), so a second
crash within a second forgot whom to wait for, and `--reconnect-grace` did nothing on that start.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aviary.app import ControlPlane, ServeConfig
from aviary.store.sqlite import StateStore


async def test_a_restart_keeps_saving_the_proxies_it_still_waits_for(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    previous = StateStore(state)
    previous.mark_alive(time.time() - 5, ["envoy-1"])
    previous.close()
    policies = tmp_path / "policies"
    policies.mkdir()
    plane = ControlPlane(ServeConfig(policies, xds_address="127.0.0.1:0", state_path=state, reconnect_grace=30))
    await plane.start()
    try:
        store = plane.store
        assert store is not None
        before = time.time()
        deadline = time.monotonic() + 10
        while (store.last_alive()[0] or 0) < before:  # wait for a heartbeat written by this process
            assert time.monotonic() < deadline, "no heartbeat"
            await asyncio.sleep(0.05)
        assert store.last_alive()[1] == frozenset({"envoy-1"})
    finally:
        await plane.stop()
