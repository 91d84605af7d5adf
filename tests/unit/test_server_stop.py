"""Stopping the control plane ends every ADS stream cleanly.

Before: grpc's stop cancelled the stream handlers still running after the grace period and logged
each as "Exception not handled ... StreamAggregatedResources" with a CancelledError traceback (at
ERROR, on every SIGTERM with a proxy connected), and the proxy saw CANCELLED.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from aviary.app import ControlPlane, ServeConfig
from aviary.discovery import typeurls
from tests.rig.ads_client import AdsClient


async def test_stop_ends_streams_with_ok_and_logs_no_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plane = ControlPlane(ServeConfig(tmp_path, xds_address="127.0.0.1:0"))
    await plane.start()
    client = AdsClient(plane.xds_port)
    try:
        client.send(typeurls.CLUSTER)
        await client.receive()
        with caplog.at_level(logging.WARNING):
            await plane.stop(grace=0.2)
        assert await client.code() is grpc.StatusCode.OK
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        await client.close()
