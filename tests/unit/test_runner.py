"""The engine loop's restart handling, with a fake clock and no sockets."""

from __future__ import annotations

import logging

import pytest

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.policy.rollout_state import Phase, RolloutStatus, Tick, WeightAcked
from aviary.runner import RolloutRunner
from aviary.store.sqlite import SavedRollout
from tests.unit.test_state_store import ROLLOUT, V1, V2


def test_a_restored_step_does_not_run_until_its_weight_is_acked_again() -> None:
    now = [2000.0]
    director = TrafficDirector(SnapshotCache(), ProxyStatus())
    director.expect_proxies({"envoy-1"}, grace=600)  # Envoy served before the crash, not back yet
    runner = RolloutRunner(director, clock=lambda: now[0])
    before = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, weight=30, step_started_at=1000.0,
                           acked_weight=30)
    runner.restore({"checkout": SavedRollout(before, ROLLOUT, 1020.0, None, ())}, last_alive=1020.0)
    assert director.desired("checkout") is not None and director.desired("checkout").canary_weight == 30

    runner.handle("checkout", Tick(now[0]))  # far past the 1m interval: still nothing may move
    status = runner.status("checkout")
    assert status is not None and status.phase is Phase.PROGRESSING and status.weight == 30
    assert status.step_started_at is None

    now[0] = 2010.0
    runner.handle("checkout", WeightAcked("v2", 30, 2010.0))  # Envoy is back and ACKed 30 %
    status = runner.status("checkout")
    assert status is not None and status.step_started_at == 2010.0 - 20.0  # 20 s were already spent
    now[0] = 2010.0 + 39.0
    runner.handle("checkout", Tick(now[0]))
    assert runner.status("checkout").weight == 30  # type: ignore[union-attr]
    now[0] = 2010.0 + 41.0
    runner.handle("checkout", Tick(now[0]))
    assert runner.status("checkout").weight == 60  # type: ignore[union-attr]


def test_transition_log_lines_label_the_canary_weight(caplog: pytest.LogCaptureFixture) -> None:
    """A promotion's last line said "Promoting -> Stable weight=0": read as "no traffic"."""
    now = [2000.0]
    runner = RolloutRunner(TrafficDirector(SnapshotCache(), ProxyStatus()), clock=lambda: now[0])
    promoting = RolloutStatus("checkout", Phase.PROMOTING, V1, V2, weight=100)
    runner.restore({"checkout": SavedRollout(promoting, ROLLOUT, 1020.0, None, ())}, last_alive=1020.0)
    with caplog.at_level(logging.INFO, logger="aviary.engine"):
        runner.handle("checkout", WeightAcked("v2", 100, now[0]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rollout checkout: Promoting")]
    assert len(lines) == 1 and lines[0].startswith("rollout checkout: Promoting -> Stable, all traffic to v2: "), lines
