"""The engine loop under faults: a state store whose writes fail, and exceptions inside the engine.

A fake store raises ``sqlite3.OperationalError("database or disk is full")`` while ``full`` is set,
as SQLite does on a full disk. The director has no proxies, so every weight counts as ACKed at once
(its ACK callbacks queue events; ``process_queued`` handles them). The clock is a fake one.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import aviary.app as app_module
import aviary.runner as runner_module
from aviary.admin import render
from aviary.admin.client import AdminClient, AdminError, ClientConfig
from aviary.admin.server import AdminConfig
from aviary.app import ControlPlane, ServeConfig
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout import step
from aviary.policy.rollout_state import (
    Abort,
    Phase,
    Promote,
    ProxyNacked,
    RolloutStatus,
    SetWeight,
    Tick,
    TransitionEvent,
)
from aviary.policy.schema import PolicySet, Rollout
from aviary.runner import NotSaved, RolloutRunner, moves_away_from_stable
from aviary.store.sqlite import StateStore, StateWriteError
from aviary.traffic import Backend
from tests.rig.policies import rollout_doc
from tests.rig.waiting import async_wait_until

FULL = "database or disk is full"
HOUR = 3600.0


class FlakyStore:
    """Keeps what was saved; every write raises as SQLite does on a full disk while ``full``."""

    path = Path("/var/lib/aviary/state.db")

    def __init__(self) -> None:
        self.full = False
        self.saved: dict[str, RolloutStatus] = {}
        self.saved_rollouts: dict[str, Rollout] = {}
        self.events: list[TransitionEvent] = []
        self.published: dict[str, object] = {}
        self.failed_writes = 0

    def save(self, status: RolloutStatus, rollout: Rollout, events: Sequence[TransitionEvent] = (),
             git_commit: str | None = None) -> None:
        self._check()
        self.saved[status.rollout] = status
        self.saved_rollouts[status.rollout] = rollout
        self.events.extend(events)

    def save_many(self, saves: Iterable[tuple[RolloutStatus, Rollout, Sequence[TransitionEvent], str | None]]) -> None:
        self._check()  # one transaction: all or none
        for status, rollout, events, git_commit in saves:
            self.save(status, rollout, events, git_commit)

    def delete(self, name: str) -> None:
        self._check()
        self.saved.pop(name, None)

    def mark_alive(self, at: float, proxies: Iterable[str]) -> None:
        self._check()

    def save_published(self, name: str, published: object) -> None:
        self._check()
        self.published[name] = published

    def _check(self) -> None:
        if self.full:
            self.failed_writes += 1
            raise sqlite3.OperationalError(FULL)


def rollout(version: str, steps: tuple[int, ...] = (20, 50)) -> Rollout:
    parsed, errors = parse_policy_text(yaml.safe_dump(rollout_doc("shop", version, steps)), "shop.yaml")
    assert parsed is not None, errors
    return parsed


class Stage:
    def __init__(self) -> None:
        self.now = 1000.0
        self.store = FlakyStore()
        self.director = TrafficDirector(SnapshotCache(), ProxyStatus())
        self.runner = RolloutRunner(self.director, clock=lambda: self.now, store=cast(StateStore, self.store))

    def apply(self, version: str) -> None:
        self.runner.apply_policies(PolicySet({"shop": rollout(version)}))
        self.runner.process_queued()  # the director's ACKs (no proxies: at once)

    def status(self) -> RolloutStatus:
        status = self.runner.status("shop")
        assert status is not None
        return status

    def envoy_weight(self) -> int | None:
        """The canary weight handed to the director; None: no canary in the desired traffic."""
        desired = self.director.desired("shop")
        assert desired is not None
        return desired.canary_weight if desired.canary is not None else None

    def saved(self) -> tuple[str, int]:
        saved = self.store.saved["shop"]
        return saved.phase.value, saved.weight

    def canary_at_first_step(self) -> None:
        self.apply("v1")
        self.apply("v2")
        assert (self.status().phase, self.status().weight, self.envoy_weight()) == (Phase.PROGRESSING, 20, 20)
        assert self.status().step_started_at is not None and self.saved() == ("Progressing", 20)


@pytest.fixture
def stage() -> Stage:
    return Stage()


# ---- moves away from stable wait for their save ----------------------------------------------


def test_a_step_up_is_not_published_until_it_is_saved(stage: Stage) -> None:
    stage.canary_at_first_step()
    stage.store.full = True
    stage.now += HOUR + 1  # the 1h step is over
    with pytest.raises(NotSaved) as info:
        stage.runner.handle("shop", Tick(stage.now))
    assert str(stage.store.path) in info.value.error and FULL in info.value.error
    assert (stage.status().weight, stage.envoy_weight(), stage.saved()) == (20, 20, ("Progressing", 20))
    assert stage.runner.state_error("shop") == info.value.error
    health = stage.runner.health()
    assert not health.serving and health.state_error == info.value.error

    stage.runner.retry()  # still full: still held, nothing published
    assert (stage.status().weight, stage.envoy_weight()) == (20, 20)

    stage.store.full = False
    stage.now += 1
    stage.runner.retry()
    assert stage.runner.state_error("shop") is None and stage.runner.health().serving
    stage.runner.handle("shop", Tick(stage.now))
    assert (stage.status().weight, stage.envoy_weight(), stage.saved()) == (50, 50, ("Progressing", 50))


def test_an_upward_admin_command_is_refused_when_it_cannot_be_saved(stage: Stage) -> None:
    stage.canary_at_first_step()
    stage.store.full = True
    for command in (Promote(), SetWeight(80)):
        with pytest.raises(NotSaved):
            stage.runner.command("shop", command)
        assert (stage.status().phase, stage.status().weight, stage.envoy_weight()) == (Phase.PROGRESSING, 20, 20)
    stage.store.full = False
    assert stage.runner.command("shop", Promote()).phase is Phase.PROMOTING
    assert stage.envoy_weight() == 100 and stage.saved() == ("Promoting", 100)


# ---- moves toward stable go out at once and are saved later ---------------------------------


def test_a_rollback_is_published_at_once_and_saved_once_the_store_recovers(stage: Stage) -> None:
    stage.canary_at_first_step()
    stage.store.full = True
    stage.runner.handle("shop", ProxyNacked("envoy-1", "rejected"))
    assert stage.status().phase is Phase.ROLLED_BACK and stage.envoy_weight() is None  # pushed
    assert stage.saved() == ("Progressing", 20)  # not saved
    error = stage.runner.state_error("shop")
    assert error is not None and FULL in error and not stage.runner.health().serving

    stage.runner.retry()
    assert stage.saved() == ("Progressing", 20) and stage.store.failed_writes >= 2

    stage.store.full = False
    stage.runner.retry()
    assert stage.saved() == ("RolledBack", 0)
    assert stage.store.events[-1].to_phase is Phase.ROLLED_BACK  # the event kept while unsaved
    assert stage.runner.state_error("shop") is None and stage.runner.health().serving


def test_an_abort_and_a_lower_weight_apply_while_the_store_is_full(stage: Stage) -> None:
    stage.canary_at_first_step()
    stage.store.full = True
    assert stage.runner.command("shop", SetWeight(5)).weight == 5 and stage.envoy_weight() == 5
    assert stage.runner.command("shop", Abort()).phase is Phase.ROLLED_BACK and stage.envoy_weight() is None
    assert stage.saved() == ("Progressing", 20)
    stage.store.full = False
    stage.runner.retry()
    assert stage.saved() == ("RolledBack", 0)
    assert [e.to_phase for e in stage.store.events[-2:]] == [Phase.PAUSED, Phase.ROLLED_BACK]


def test_which_moves_go_away_from_stable() -> None:
    v1, v2, v3 = (Backend(v, ()) for v in ("v1", "v2", "v3"))
    stable = RolloutStatus("shop", Phase.STABLE, v1)
    at_20 = RolloutStatus("shop", Phase.PROGRESSING, v1, v2, weight=20)
    at_50 = RolloutStatus("shop", Phase.PROGRESSING, v1, v2, weight=50)
    promoting = RolloutStatus("shop", Phase.PROMOTING, v1, v2, weight=100)
    rolled_back = RolloutStatus("shop", Phase.ROLLED_BACK, v1, failed_version="v2")
    assert moves_away_from_stable(None, stable)  # first sight
    assert moves_away_from_stable(stable, at_20)  # a new canary
    assert moves_away_from_stable(stable, RolloutStatus("shop", Phase.PROGRESSING, v1, v2, weight=0))
    assert moves_away_from_stable(at_20, at_50) and moves_away_from_stable(at_50, promoting)
    assert moves_away_from_stable(stable, RolloutStatus("shop", Phase.STABLE, v2))  # no strategy
    assert moves_away_from_stable(at_20, RolloutStatus("shop", Phase.PROGRESSING, v1, v3, weight=20))
    assert not moves_away_from_stable(at_50, at_20)
    assert not moves_away_from_stable(at_20, rolled_back) and not moves_away_from_stable(at_20, stable)
    assert not moves_away_from_stable(promoting, RolloutStatus("shop", Phase.STABLE, v2))  # promotion ends
    assert not moves_away_from_stable(at_20, RolloutStatus("shop", Phase.PROGRESSING, v1, v2, weight=20,
                                                           step_started_at=5.0))  # an ACK


# ---- a policy that could not be applied is retried -----------------------------------------


def test_a_new_version_seen_while_the_store_is_full_is_applied_once_it_recovers(stage: Stage) -> None:
    stage.apply("v1")
    stage.store.full = True
    stage.apply("v2")
    assert stage.runner.rollout("shop") is not None and stage.runner.rollout("shop").spec.version == "v1"  # type: ignore[union-attr]
    assert stage.status().phase is Phase.STABLE and stage.envoy_weight() is None
    assert stage.runner.pending() == ["shop"]
    assert any("policy change not applied" in p for p in stage.runner.health().problems)
    stage.runner.retry()
    assert stage.runner.pending() == ["shop"]

    stage.store.full = False
    stage.runner.retry()
    stage.runner.process_queued()
    assert stage.runner.pending() == []
    assert (stage.status().phase, stage.status().canary, stage.envoy_weight()) == (
        Phase.PROGRESSING, stage.status().canary, 20)
    assert stage.status().canary is not None and stage.status().canary.version == "v2"  # type: ignore[union-attr]
    assert stage.saved() == ("Progressing", 20)


def test_a_new_rollout_seen_while_the_store_is_full_is_served_once_it_is_saved(stage: Stage) -> None:
    stage.store.full = True
    stage.apply("v1")
    assert stage.runner.status("shop") is None and stage.director.desired("shop") is None
    stage.store.full = False
    stage.runner.retry()
    assert stage.status().phase is Phase.STABLE and stage.director.desired("shop") is not None


# ---- nothing in the loop dies silently ------------------------------------------------------


async def test_an_exception_in_handle_does_not_end_the_loop(
    stage: Stage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stage.canary_at_first_step()
    calls = {"failures": 0}

    def broken_step(*args: Any, **kwargs: Any) -> Any:
        if isinstance(args[2], ProxyNacked) and calls["failures"] < 2:
            calls["failures"] += 1
            raise RuntimeError("injected fault")
        return step(*args, **kwargs)

    monkeypatch.setattr(runner_module, "step", broken_step)
    task = asyncio.create_task(stage.runner.run())
    try:
        stage.runner.submit("shop", ProxyNacked("envoy-1", "first"))
        stage.runner.submit("shop", ProxyNacked("envoy-1", "second"))
        await async_wait_until(lambda: calls["failures"] == 2, 5, what="two injected faults")
        assert not task.done()
        assert stage.runner.engine_error("shop") == "RuntimeError: injected fault"
        assert stage.runner.engine_error_counts() == {"shop": 2}
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "injected fault" in r.getMessage()]
        assert len(errors) == 1 and errors[0].exc_info is not None  # the traceback, once
        assert "shop" in errors[0].getMessage()

        stage.runner.submit("shop", ProxyNacked("envoy-1", "third"))  # handled: the loop goes on
        await async_wait_until(lambda: stage.status().phase is Phase.ROLLED_BACK, 5, what="the rollback")
        assert stage.runner.engine_error("shop") is None and stage.envoy_weight() is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_loop_retries_a_pending_policy_by_itself(stage: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "RETRY_SECONDS", 0.05)
    real_now = asyncio.get_running_loop().time
    stage.runner = RolloutRunner(stage.director, clock=real_now, store=cast(StateStore, stage.store))
    task = asyncio.create_task(stage.runner.run())
    try:
        stage.apply("v1")
        stage.store.full = True
        stage.apply("v2")
        await async_wait_until(lambda: stage.store.failed_writes >= 3, 5, what="retries of the save")
        assert stage.status().phase is Phase.STABLE and stage.runner.pending() == ["shop"]
        stage.store.full = False
        await async_wait_until(lambda: stage.runner.pending() == [], 5, what="the pending policy applied")
        await async_wait_until(lambda: stage.saved() == ("Progressing", 20), 5, what="the canary saved")
        assert stage.envoy_weight() == 20 and stage.runner.health().serving
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- the admin API and the health service ---------------------------------------------------


async def test_admin_commands_status_and_health_while_the_state_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(yaml.safe_dump(rollout_doc("shop", "v1")))
    config = ServeConfig(policies, xds_address="127.0.0.1:0", state_path=tmp_path / "state.db",
                         admin=AdminConfig("127.0.0.1:0"))
    plane = ControlPlane(config)
    await plane.start()
    try:
        plane.runner.apply_policies(PolicySet({"shop": rollout("v2")}))
        store = plane.store
        assert store is not None

        def full(*args: object, **kwargs: object) -> None:
            raise StateWriteError(store.path, FULL)

        async with AdminClient(ClientConfig(f"127.0.0.1:{plane.admin_port}")) as client, \
                grpc.aio.insecure_channel(f"127.0.0.1:{plane.admin_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                response = await health.Check(health_pb2.HealthCheckRequest(service=""))
                return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

            async def not_serving() -> bool:
                return not await serving()

            assert (await client.get_rollout("shop")).weight == 20 and await serving()
            monkeypatch.setattr(store, "save_many", full)
            monkeypatch.setattr(store, "mark_alive", full)

            with pytest.raises(AdminError) as info:
                await client.command("promote", "shop")
            refusal = info.value
            assert refusal.code is grpc.StatusCode.UNAVAILABLE and refusal.refused
            assert refusal.detail == f"state file {store.path} cannot be written: {FULL}; the command was not applied"
            assert str(refusal).startswith("unavailable: state file ")
            assert (await client.get_rollout("shop")).weight == 20  # not applied

            aborted = await client.command("abort", "shop")  # toward stable: applied, saved later
            assert aborted.phase == "RolledBack" and FULL in aborted.state_error
            assert "NOT SAVED yet" in render.rollout_line(aborted)
            overview = await client.overview()
            assert not overview.health.serving and FULL in overview.health.state_error
            line = render.health_line(overview.health)
            assert line is not None and line.plain.startswith(f"STATE NOT SAVED: state file {store.path}")
            await async_wait_until(lambda: not plane.runner.health().serving, 5, what="engine health down")
            await async_wait_until(not_serving, 5, what="health NOT_SERVING")  # within HEALTH_POLL_SECONDS

            monkeypatch.undo()  # the disk has space again
            await async_wait_until(lambda: plane.runner.health().serving, 5, what="state saved again")
            await async_wait_until(serving, 5, what="health SERVING")
            shop = await client.get_rollout("shop")
            assert shop.state_error == "" and (await client.overview()).health.state_error == ""
            assert store.load()["shop"].status.phase is Phase.ROLLED_BACK
    finally:
        await plane.stop(0)


async def test_the_engine_task_is_restarted_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app_module, "RESTART_SECONDS", 0.05)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(yaml.safe_dump(rollout_doc("shop", "v1")))
    plane = ControlPlane(ServeConfig(policies, xds_address="127.0.0.1:0"))
    real_run = plane.runner.run
    runs: list[int] = []

    async def failing_once() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("injected engine crash")
        await real_run()

    monkeypatch.setattr(plane.runner, "run", failing_once)
    await plane.start()
    try:
        await async_wait_until(lambda: len(runs) == 2, 5, what="the engine started again")
        assert plane.restarts["rollout engine"] == 1
        crash = [r for r in caplog.records if r.levelname == "ERROR" and "rollout engine failed" in r.getMessage()]
        assert len(crash) == 1 and crash[0].exc_info is not None
        plane.runner.apply_policies(PolicySet({"shop": rollout("v2")}))  # the restarted loop carries on
        await async_wait_until(lambda: (s := plane.runner.status("shop")) is not None and s.acked_weight == 20, 5,
                               what="the new canary's weight ACKed through the restarted loop")
        assert plane.health().serving
    finally:
        await plane.stop(0)


def test_what_was_published_during_a_full_disk_is_saved_once_it_frees(stage: Stage) -> None:
    """Before: the saved route stayed 80/20 after an abort on a full disk (only the status was
    re-saved), so a restart sent reconnecting proxies the aborted canary's 20 % again."""
    stage.canary_at_first_step()
    stage.store.full = True
    stage.runner.command("shop", Abort())
    assert stage.envoy_weight() is None  # the rollback reached the director at once
    assert not stage.runner.health().serving
    stage.store.full = False
    stage.now += runner_module.RETRY_SECONDS
    stage.runner.retry()
    saved = stage.store.published["shop"]
    assert [weight for _, weight in saved.route] == [100], saved  # type: ignore[attr-defined]
    assert stage.runner.health().serving


def test_an_edited_host_is_saved_even_when_the_status_does_not_change(stage: Stage) -> None:
    """An orphan restored after a restart must serve the hosts its file had last, not older ones."""
    stage.apply("v1")
    moved = rollout("v1").model_copy(deep=True)
    spec = moved.spec.model_copy(update={"hosts": ("moved.example.com",)})
    moved = moved.model_copy(update={"spec": spec})
    saves = len(stage.store.saved)
    stage.runner.apply_policies(PolicySet({"shop": moved}))
    stage.runner.process_queued()
    assert stage.runner.rollout("shop") == moved and saves == len(stage.store.saved)
    assert stage.store.saved_rollouts["shop"].spec.hosts == ("moved.example.com",)
