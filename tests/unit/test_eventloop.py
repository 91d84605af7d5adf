"""`aviary serve` runs on uvloop unless AVIARY_UVLOOP=0 (aviary.eventloop)."""

from __future__ import annotations

import asyncio

import pytest

from aviary import eventloop


async def _loop_kind() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVIARY_UVLOOP", raising=False)
    assert eventloop.run(_loop_kind()) == "uvloop"


def test_asyncio_loop_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVIARY_UVLOOP", "0")
    assert eventloop.run(_loop_kind()) == "asyncio"
