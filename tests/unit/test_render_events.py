"""How `aviary watch` and `aviary status` word a transition: the canary's weight is labelled as such."""

from __future__ import annotations

from aviary.admin import render
from aviary.admin.v1 import admin_pb2 as pb


def event(**fields: object) -> pb.RolloutEvent:
    message = pb.RolloutEvent(rollout="shop", reason="why", **fields)  # type: ignore[arg-type]
    message.time.FromSeconds(0)
    return message


def test_a_step_names_the_canary_and_its_weight() -> None:
    line = render.event_line(event(from_phase="Progressing", to_phase="Progressing", weight=30,
                                   stable_version="v1", canary_version="v2"))
    assert line.endswith("shop: Progressing -> Progressing, canary v2 at 30%: why")


def test_stable_says_where_all_traffic_goes_not_a_weight_of_zero() -> None:
    line = render.event_line(event(from_phase="Promoting", to_phase="Stable", weight=0, stable_version="v2"))
    assert line.endswith("shop: Promoting -> Stable, all traffic to v2: why")
    assert "0%" not in line
