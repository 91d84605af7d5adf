"""The rollout engine's public surface: status, events, actions and the pure ``step`` function.

The values live in ``rollout_state`` and the logic in ``rollout_machine`` (its docstring states
the rules); import from here.
"""

from __future__ import annotations

from aviary.policy.rollout_machine import (
    analysis_for,
    checks_due,
    guard_analysis,
    guard_left,
    next_wakeup,
    step,
    step_cohorts,
    step_mirror,
    step_weight,
    traffic_plan,
)
from aviary.policy.rollout_state import (
    Abort,
    Action,
    AdminCommand,
    ChecksCompleted,
    Event,
    Hold,
    PauseRollout,
    Phase,
    Promote,
    ProxyNacked,
    RecordEvent,
    Rejected,
    Resume,
    Retry,
    RolloutStatus,
    SetTraffic,
    SetWeight,
    SpecObserved,
    Tick,
    TransitionEvent,
    WeightAcked,
)

__all__ = [
    "Abort",
    "Action",
    "AdminCommand",
    "ChecksCompleted",
    "Event",
    "Hold",
    "PauseRollout",
    "Phase",
    "Promote",
    "ProxyNacked",
    "RecordEvent",
    "Rejected",
    "Resume",
    "Retry",
    "RolloutStatus",
    "SetTraffic",
    "SetWeight",
    "SpecObserved",
    "Tick",
    "TransitionEvent",
    "WeightAcked",
    "analysis_for",
    "checks_due",
    "guard_analysis",
    "guard_left",
    "next_wakeup",
    "step",
    "step_cohorts",
    "step_mirror",
    "step_weight",
    "traffic_plan",
]
