"""``aviary simulate --plot FILE``: the run as a PNG timeline (matplotlib, no display needed).

Top panel: the canary's weight over time, with the promotion or rollback marked. One panel per
check below it: the canary's value and stable's (when the check measures both) at every round,
each round's verdict as the marker's colour. A reader sees at a glance which metric moved, when,
and what the engine did about it.
"""

from __future__ import annotations

import math
from pathlib import Path

from aviary.policy.analysis import CheckOutcome
from aviary.simulation.replay import Outcome, SimulationResult

__all__ = ["plot"]

_COLOURS = {CheckOutcome.PASS: "tab:green", CheckOutcome.FAIL: "tab:red", CheckOutcome.INCONCLUSIVE: "tab:gray"}


def plot(result: SimulationResult, path: Path, title: str) -> None:
    """Write the PNG; OSError when ``path`` cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(check.name for r in result.rounds for check in r.checks))
    figure, axes = plt.subplots(1 + len(names), 1, sharex=True, squeeze=False,
                                figsize=(10, 2.2 + 1.8 * len(names)))
    panels = [axis[0] for axis in axes]

    scale, unit = (1.0, "seconds") if result.end - result.start <= 180 else (60.0, "minutes")

    def offset(at: float) -> float:
        return (at - result.start) / scale

    transitions = [t for t in result.transitions if t.from_phase is not None]
    times = [offset(t.at) for t in transitions] + [offset(result.end)]
    weights = [t.weight for t in transitions] + [transitions[-1].weight if transitions else 0]
    weight_panel = panels[0]
    weight_panel.step(times, weights, where="post", color="tab:blue")
    weight_panel.set_ylabel("canary %")
    weight_panel.set_ylim(-5, 105)
    end = offset(result.end)
    if result.outcome is Outcome.ROLLED_BACK:
        weight_panel.axvline(end, color="tab:red", linestyle="--")
        weight_panel.annotate("rollback", (end, 90), color="tab:red", ha="right")
    elif result.outcome is Outcome.PROMOTED:
        weight_panel.axvline(end, color="tab:green", linestyle="--")
        weight_panel.annotate("promoted", (end, 90), color="tab:green", ha="right")
    weight_panel.set_title(title)

    for panel, name in zip(panels[1:], names, strict=True):
        rounds = [(offset(r.at), check) for r in result.rounds for check in r.checks if check.name == name]
        canary = [(at, c.value) for at, c in rounds if c.value is not None and math.isfinite(c.value)]
        stable = [(at, c.stable_value) for at, c in rounds if c.stable_value is not None
                  and math.isfinite(c.stable_value)]
        if canary:
            panel.plot(*zip(*canary, strict=True), color="tab:orange", label="canary", linewidth=1)
        if stable:
            panel.plot(*zip(*stable, strict=True), color="tab:blue", label="stable", linewidth=1)
        for outcome, colour in _COLOURS.items():
            marked = [(at, c.value) for at, c in rounds if c.outcome is outcome
                      and c.value is not None and math.isfinite(c.value)]
            if marked:
                panel.scatter(*zip(*marked, strict=True), color=colour, s=10, zorder=3, label=outcome.value.lower())
        unmeasured = [at for at, c in rounds if c.value is None or not math.isfinite(c.value)]
        if unmeasured:  # no value to place: a tick along the bottom, in the verdict's colour
            colours = [_COLOURS[c.outcome] for _, c in rounds if c.value is None or not math.isfinite(c.value)]
            panel.scatter(unmeasured, [0.03] * len(unmeasured), color=colours, marker="|", s=60, zorder=3,
                          transform=panel.get_xaxis_transform(), label="no data")
        limits = rounds[-1][1].thresholds if rounds else None
        if limits is not None and limits.by is None:  # a threshold check: its bounds, on the canary's scale
            for bound in (limits.min, limits.max):
                if bound is not None:
                    panel.axhline(bound, color="tab:gray", linestyle=":", linewidth=1)
        panel.set_ylabel(name)
        panel.legend(loc="upper left", fontsize="x-small", ncol=5)
    panels[-1].set_xlabel(f"{unit} since the canary's policy arrived")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
