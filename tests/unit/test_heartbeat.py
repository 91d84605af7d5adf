"""The state heartbeat keeps the proxies a restarted plane still waits for.

Before: the first heartbeat after a restart wrote only the connected proxies (none yet), so a second
crash within a second forgot whom to wait for, and `--reconnect-grace` did nothing on that start.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import aviary.app as app_module
from aviary.app import ControlPlane, ServeConfig
from aviary.discovery import typeurls
from aviary.store.sqlite import StateStore
from tests.rig.ads_client import AdsClient


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


async def test_a_new_proxy_is_recorded_at_once_not_at_the_next_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a proxy that connected less than a second before a crash was not in the file, so the
    next start did not wait for it and could retire clusters its route still named."""
    monkeypatch.setattr(app_module, "HEARTBEAT_SECONDS", 3600.0)  # only the early write can record it
    policies = tmp_path / "policies"
    policies.mkdir()
    plane = ControlPlane(ServeConfig(policies, xds_address="127.0.0.1:0", state_path=tmp_path / "state.db"))
    await plane.start()
    client = AdsClient(plane.xds_port, node_id="envoy-9")
    try:
        store = plane.store
        assert store is not None
        client.send(typeurls.CLUSTER)
        await client.receive()
        deadline = time.monotonic() + 5
        while "envoy-9" not in store.last_alive()[1]:
            assert time.monotonic() < deadline, "the new proxy was not recorded"
            await asyncio.sleep(0.05)
    finally:
        await client.close()
        await plane.stop()
